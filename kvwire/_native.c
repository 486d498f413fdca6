/* kvwire._native: the per-tensor loops that Python makes cost a microsecond each.
 *
 * Over plain TCP, a layer of thousands of small tensors goes out from the engine's arrays
 * as they are: hashed piece by piece (xxh3_pieces, with xxhash's own C functions) and
 * written up to 1,024 arrays a sendmsg (send_pieces). Over UCX and TLS it is joined into
 * one buffer first, after checking each array's dtype and shape (gather, kvwire/uniform.py).
 * It is received whole into one buffer, checked, and only then copied into the engine's
 * arrays (scatter, kvwire/landing.py), described once at expect() by flat byte views of
 * them (byte_views, kvwire/uniform.py). In Python each array costs ~0.5-1 us (attribute
 * reads, a buffer export, a memoryview, a slice); here it is a few field reads of the
 * numpy array (numpy's C API) and one memcpy or iovec. kvwire/native.py holds the Python
 * twins used where this module was not built; both give the same bytes (tests/test_native.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

/* A numpy array's bytes, if it is C-contiguous (and writable when asked): read from the
 * array itself. Asking numpy for a buffer instead costs ~0.3 us an array (it builds the
 * format and shape it exports), which for 65,536 small tensors was most of a layer's time. */
static int
plain_array(PyObject *object, int writable, char **data, Py_ssize_t *nbytes)
{
    if (!PyArray_Check(object))
        return 0;
    PyArrayObject *array = (PyArrayObject *)object;
    int need = NPY_ARRAY_C_CONTIGUOUS | (writable ? NPY_ARRAY_WRITEABLE : 0);
    if ((PyArray_FLAGS(array) & need) != need)
        return 0;
    *data = PyArray_BYTES(array);
    *nbytes = (Py_ssize_t)PyArray_NBYTES(array);
    return 1;
}

PyDoc_STRVAR(scatter_doc,
"scatter(source, destinations) -> int\n\n"
"Copy consecutive bytes of ``source`` into each writable, contiguous buffer of the list\n"
"``destinations`` in turn; return the bytes copied. ValueError naming the first\n"
"destination the rest of ``source`` cannot fill (those before it are written: callers\n"
"pass destinations that sum to the source); the buffer's own error if one is read-only\n"
"or not contiguous.");

static PyObject *
scatter(PyObject *module, PyObject *args)
{
    Py_buffer source;
    PyObject *destinations;
    if (!PyArg_ParseTuple(args, "y*O!:scatter", &source, &PyList_Type, &destinations))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(destinations);
    Py_ssize_t position = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        char *data;
        Py_ssize_t nbytes;
        if (plain_array(PyList_GET_ITEM(destinations, i), 1, &data, &nbytes)) {
            if (nbytes > source.len - position) {
                PyErr_Format(PyExc_ValueError, "scatter: destination %zd needs %zd bytes, the source has %zd left", i,
                             nbytes, source.len - position);
                goto fail;
            }
            memcpy(data, (const char *)source.buf + position, (size_t)nbytes);
            position += nbytes;
            continue;
        }
        Py_buffer view; /* any other buffer (and the buffer protocol's own error if it is not one) */
        if (PyObject_GetBuffer(PyList_GET_ITEM(destinations, i), &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            goto fail;
        if (view.len > source.len - position) {
            PyErr_Format(PyExc_ValueError, "scatter: destination %zd needs %zd bytes, the source has %zd left", i,
                         view.len, source.len - position);
            PyBuffer_Release(&view);
            goto fail;
        }
        memcpy(view.buf, (const char *)source.buf + position, (size_t)view.len);
        position += view.len;
        PyBuffer_Release(&view);
    }
    PyBuffer_Release(&source);
    return PyLong_FromSsize_t(position);
fail:
    PyBuffer_Release(&source);
    return NULL;
}

PyDoc_STRVAR(gather_doc,
"gather(sources, dtypes, shapes, destination) -> bool\n\n"
"Copy each array of the list ``sources`` into ``destination`` one after the other, if\n"
"each is a C-contiguous numpy array of the dtype ``dtypes[i]`` and the shape ``shapes[i]``\n"
"(a tuple) and they fit; True if all were copied, False at the first that is not so\n"
"(``destination`` is then partly written: the caller discards it). With ``destination``\n"
"None, only check them (arrays that go out as they are).");

static int
has_shape(PyArrayObject *array, PyObject *shape)
{
    int ndim = PyArray_NDIM(array);
    if (!PyTuple_Check(shape) || PyTuple_GET_SIZE(shape) != ndim)
        return 0;
    npy_intp *dims = PyArray_DIMS(array);
    for (int d = 0; d < ndim; d++) {
        Py_ssize_t want = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape, d));
        if (want == -1 && PyErr_Occurred())
            return -1;
        if (want != dims[d])
            return 0;
    }
    return 1;
}

static PyObject *
gather(PyObject *module, PyObject *args)
{
    PyObject *sources, *dtypes, *shapes, *out;
    if (!PyArg_ParseTuple(args, "O!O!O!O:gather", &PyList_Type, &sources, &PyList_Type, &dtypes, &PyList_Type,
                          &shapes, &out))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(sources);
    if (PyList_GET_SIZE(dtypes) != count || PyList_GET_SIZE(shapes) != count) {
        PyErr_SetString(PyExc_ValueError, "gather: sources, dtypes and shapes differ in length");
        return NULL;
    }
    Py_buffer destination;
    int copying = out != Py_None;
    if (copying && PyObject_GetBuffer(out, &destination, PyBUF_WRITABLE) < 0)
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t position = 0;
    int ok = 1;
    for (Py_ssize_t i = 0; i < count && ok; i++) {
        PyObject *source = PyList_GET_ITEM(sources, i), *dtype = PyList_GET_ITEM(dtypes, i);
        if (!PyArray_DescrCheck(dtype)) {
            PyErr_Format(PyExc_TypeError, "gather: dtypes[%zd] is not a numpy dtype", i);
            goto done;
        }
        char *data;
        Py_ssize_t nbytes;
        if (!plain_array(source, 0, &data, &nbytes))
            ok = 0; /* not a contiguous numpy array: the general path says what it is */
        else {
            PyArray_Descr *have = PyArray_DESCR((PyArrayObject *)source);
            int shaped = has_shape((PyArrayObject *)source, PyList_GET_ITEM(shapes, i));
            if (shaped < 0)
                goto done;
            ok = shaped && (have == (PyArray_Descr *)dtype || PyArray_EquivTypes(have, (PyArray_Descr *)dtype))
                 && (!copying || nbytes <= destination.len - position);
        }
        if (ok && copying) {
            memcpy((char *)destination.buf + position, data, (size_t)nbytes);
            position += nbytes;
        }
    }
    result = PyBool_FromLong(ok);
done:
    if (copying)
        PyBuffer_Release(&destination);
    return result;
}

PyDoc_STRVAR(byte_views_doc,
"byte_views(arrays) -> list | None\n\n"
"A flat uint8 view of each array of the list ``arrays`` (each exactly a numpy ndarray,\n"
"C-contiguous, writable and not empty: where a layer's bytes land), or None if one is\n"
"not so. (``np.frombuffer`` costs ~0.5 us an array: the buffer export and its checks.)");

static PyObject *
byte_views(PyObject *module, PyObject *args)
{
    PyObject *arrays;
    if (!PyArg_ParseTuple(args, "O!:byte_views", &PyList_Type, &arrays))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(arrays);
    PyObject *views = PyList_New(count);
    if (views == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *array = PyList_GET_ITEM(arrays, i);
        char *data;
        Py_ssize_t nbytes;
        if (!PyArray_CheckExact(array) || !plain_array(array, 1, &data, &nbytes) || nbytes == 0) {
            Py_DECREF(views);
            Py_RETURN_NONE;
        }
        npy_intp dims[1] = {(npy_intp)nbytes};
        PyObject *view = PyArray_NewFromDescr(&PyArray_Type, PyArray_DescrFromType(NPY_UINT8), 1, dims, NULL, data,
                                              NPY_ARRAY_CARRAY, NULL);
        if (view == NULL) {
            Py_DECREF(views);
            return NULL;
        }
        Py_INCREF(array); /* the view keeps its array alive (stolen by SetBaseObject, even on failure) */
        if (PyArray_SetBaseObject((PyArrayObject *)view, array) < 0) {
            Py_DECREF(view);
            Py_DECREF(views);
            return NULL;
        }
        PyList_SET_ITEM(views, i, view);
    }
    return views;
}

/* A piece of a frame (a numpy array, bytes, a memoryview): its bytes, read from the array
 * itself where it is a C-contiguous numpy array (no buffer export), else through the buffer
 * protocol (``*view`` is then filled and must be released). -1 with an error set if it is
 * neither. */
static int
piece_bytes(PyObject *piece, const char **data, Py_ssize_t *nbytes, Py_buffer *view, int *has_view)
{
    char *bytes;
    if (plain_array(piece, 0, &bytes, nbytes)) {
        *data = bytes;
        *has_view = 0;
        return 0;
    }
    if (PyObject_GetBuffer(piece, view, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    *data = (const char *)view->buf;
    *nbytes = view->len;
    *has_view = 1;
    return 0;
}

/* xxh3-64's streaming functions, found in the ``xxhash`` package's own compiled module (it
 * exports xxhash's C API): bound once by ``bind_xxh3``. kvwire needs no copy of xxhash's
 * source, and the digests are those of the library the receiver checks with. */
typedef void *(*xxh3_create_fn)(void);
typedef int (*xxh3_free_fn)(void *);
typedef int (*xxh3_reset_fn)(void *, uint64_t);
typedef int (*xxh3_update_fn)(void *, const void *, size_t);
typedef uint64_t (*xxh3_digest_fn)(const void *);
static xxh3_create_fn xxh3_create;
static xxh3_free_fn xxh3_free;
static xxh3_reset_fn xxh3_reset;
static xxh3_update_fn xxh3_update;
static xxh3_digest_fn xxh3_digest;

#define RELEASE_GIL_BYTES (64 * 1024) /* a piece this large is hashed without the GIL */

PyDoc_STRVAR(bind_xxh3_doc,
"bind_xxh3(path) -> bool\n\n"
"Find xxh3-64's streaming functions in the shared library ``path`` (the ``xxhash``\n"
"package's compiled module, already loaded); True if all were found (``xxh3_pieces`` then\n"
"works), False otherwise.");

static PyObject *
bind_xxh3(PyObject *module, PyObject *args)
{
    const char *path;
    if (!PyArg_ParseTuple(args, "s:bind_xxh3", &path))
        return NULL;
    void *library = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (library == NULL)
        library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (library == NULL)
        Py_RETURN_FALSE;
    /* (the dispatching update picks the CPU's widest vector unit, as xxhash's own does) */
    void *update = dlsym(library, "XXH3_64bits_update_dispatch");
    if (update == NULL)
        update = dlsym(library, "XXH3_64bits_update");
    void *create = dlsym(library, "XXH3_createState"), *free_state = dlsym(library, "XXH3_freeState");
    void *reset = dlsym(library, "XXH3_64bits_reset_withSeed"), *digest = dlsym(library, "XXH3_64bits_digest");
    if (!update || !create || !free_state || !reset || !digest)
        Py_RETURN_FALSE; /* (the library stays loaded: it is the xxhash module Python holds) */
    xxh3_create = (xxh3_create_fn)create;
    xxh3_free = (xxh3_free_fn)free_state;
    xxh3_reset = (xxh3_reset_fn)reset;
    xxh3_update = (xxh3_update_fn)update;
    xxh3_digest = (xxh3_digest_fn)digest;
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(xxh3_pieces_doc,
"xxh3_pieces(seed, pieces) -> int\n\n"
"xxh3-64 with ``seed`` of the bytes of the list ``pieces`` one after the other (numpy\n"
"arrays read as they are; anything else through the buffer protocol): the digest of\n"
"their concatenation, without joining them. RuntimeError before ``bind_xxh3`` succeeded.");

static PyObject *
xxh3_pieces(PyObject *module, PyObject *args)
{
    unsigned long long seed;
    PyObject *pieces;
    if (!PyArg_ParseTuple(args, "KO!:xxh3_pieces", &seed, &PyList_Type, &pieces))
        return NULL;
    if (xxh3_create == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "xxh3_pieces: xxh3 is not bound (bind_xxh3)");
        return NULL;
    }
    void *state = xxh3_create();
    if (state == NULL)
        return PyErr_NoMemory();
    xxh3_reset(state, (uint64_t)seed);
    Py_ssize_t count = PyList_GET_SIZE(pieces);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *piece = PyList_GET_ITEM(pieces, i);
        const char *data;
        Py_ssize_t nbytes;
        Py_buffer view;
        int has_view;
        if (piece_bytes(piece, &data, &nbytes, &view, &has_view) < 0) {
            xxh3_free(state);
            return NULL;
        }
        if (nbytes >= RELEASE_GIL_BYTES) {
            Py_INCREF(piece); /* (kept whole while other threads run) */
            Py_BEGIN_ALLOW_THREADS
            xxh3_update(state, data, (size_t)nbytes);
            Py_END_ALLOW_THREADS
            Py_DECREF(piece);
        }
        else
            xxh3_update(state, data, (size_t)nbytes);
        if (has_view)
            PyBuffer_Release(&view);
    }
    uint64_t digest = xxh3_digest(state);
    xxh3_free(state);
    return PyLong_FromUnsignedLongLong((unsigned long long)digest);
}

#define MAX_IOV 1024 /* Linux's IOV_MAX */

PyDoc_STRVAR(send_pieces_doc,
"send_pieces(fd, pieces, index, offset, flags) -> (index, offset)\n\n"
"``sendmsg`` the bytes of the list ``pieces`` from byte ``offset`` of ``pieces[index]`` on,\n"
"up to 1,024 pieces a call (numpy arrays as they are: Python's own ``sendmsg`` asks each for\n"
"a buffer), without the GIL. Returns where it stopped: ``(len(pieces), 0)`` once all is\n"
"written, or earlier where ``flags`` has MSG_DONTWAIT and the socket takes no more. OSError\n"
"as ``socket.sendmsg`` raises it.");

static PyObject *
send_pieces(PyObject *module, PyObject *args)
{
    int fd, flags;
    PyObject *pieces;
    Py_ssize_t index, offset;
    if (!PyArg_ParseTuple(args, "iO!nni:send_pieces", &fd, &PyList_Type, &pieces, &index, &offset, &flags))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(pieces);
    if (index < 0 || offset < 0 || index > count) {
        PyErr_SetString(PyExc_ValueError, "send_pieces: index or offset out of range");
        return NULL;
    }
    struct iovec *iov = PyMem_Malloc(MAX_IOV * sizeof(struct iovec));
    Py_buffer *views = PyMem_Malloc(MAX_IOV * sizeof(Py_buffer));
    PyObject **held = PyMem_Malloc(MAX_IOV * sizeof(PyObject *));
    if (iov == NULL || views == NULL || held == NULL) {
        PyMem_Free(iov);
        PyMem_Free(views);
        PyMem_Free(held);
        return PyErr_NoMemory();
    }
    PyObject *result = NULL;
    while (index < count) {
        /* the next pieces as iovecs: held[k] is piece index + k (views[k] filled if has[k]) */
        int n_iov = 0;
        char has[MAX_IOV];
        Py_ssize_t first_offset = offset;
        int failed = 0;
        for (Py_ssize_t j = index; j < count && n_iov < MAX_IOV; j++) {
            PyObject *piece = PyList_GET_ITEM(pieces, j);
            const char *data;
            Py_ssize_t nbytes;
            int has_view;
            if (piece_bytes(piece, &data, &nbytes, &views[n_iov], &has_view) < 0) {
                failed = 1;
                break;
            }
            Py_ssize_t skip = (j == index) ? first_offset : 0;
            if (skip > nbytes)
                skip = nbytes;
            iov[n_iov].iov_base = (void *)(data + skip);
            iov[n_iov].iov_len = (size_t)(nbytes - skip);
            has[n_iov] = (char)has_view;
            Py_INCREF(piece);
            held[n_iov++] = piece;
        }
        ssize_t sent = 0;
        int error = 0;
        if (!failed) {
            struct msghdr message;
            memset(&message, 0, sizeof(message));
            message.msg_iov = iov;
            message.msg_iovlen = (size_t)n_iov;
            Py_BEGIN_ALLOW_THREADS
            sent = sendmsg(fd, &message, flags | MSG_NOSIGNAL);
            error = errno;
            Py_END_ALLOW_THREADS
        }
        for (int k = 0; k < n_iov; k++) {
            if (has[k])
                PyBuffer_Release(&views[k]);
            Py_DECREF(held[k]);
        }
        if (failed)
            goto done;
        if (sent < 0) {
            if (error == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    goto done;
                continue;
            }
            if ((error == EAGAIN || error == EWOULDBLOCK) && (flags & MSG_DONTWAIT))
                break;
            errno = error;
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        /* advance past what was written: whole iovecs, then into the next */
        size_t left = (size_t)sent;
        int k = 0;
        while (k < n_iov && left >= iov[k].iov_len) {
            left -= iov[k].iov_len;
            k++;
        }
        if (k == 0)
            offset += (Py_ssize_t)left;
        else {
            index += k;
            offset = (Py_ssize_t)left;
        }
    }
    if (index >= count)
        offset = 0;
    result = Py_BuildValue("(nn)", index, offset);
done:
    PyMem_Free(iov);
    PyMem_Free(views);
    PyMem_Free(held);
    return result;
}

static PyMethodDef methods[] = {
    {"scatter", scatter, METH_VARARGS, scatter_doc},
    {"gather", gather, METH_VARARGS, gather_doc},
    {"byte_views", byte_views, METH_VARARGS, byte_views_doc},
    {"bind_xxh3", bind_xxh3, METH_VARARGS, bind_xxh3_doc},
    {"xxh3_pieces", xxh3_pieces, METH_VARARGS, xxh3_pieces_doc},
    {"send_pieces", send_pieces, METH_VARARGS, send_pieces_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvwire._native", "kvwire's compiled per-tensor loops (see kvwire/native.py).", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    import_array(); /* numpy's C API (an ImportError here: kvwire/native.py takes the Python twins) */
    return PyModule_Create(&module);
}
