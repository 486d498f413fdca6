/* kvwire._native: the per-tensor loops that Python makes cost a microsecond each.
 *
 * A layer of thousands of small tensors is sent as one buffer, joined from the engine's
 * arrays after checking each one's dtype and shape (gather, kvwire/uniform.py), and
 * received whole into one buffer, checked, and only then copied into the engine's arrays
 * (scatter, kvwire/landing.py). In Python each array costs ~0.5-1 us (attribute reads,
 * a memoryview, a slice); here it is a few field reads of the numpy array (numpy's C API)
 * and one memcpy. kvwire/native.py holds the Python twin used where this module was not
 * built; both give the same bytes (tests/test_native.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

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
"(``destination`` is then partly written: the caller discards it).");

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
    PyObject *sources, *dtypes, *shapes;
    Py_buffer destination;
    if (!PyArg_ParseTuple(args, "O!O!O!w*:gather", &PyList_Type, &sources, &PyList_Type, &dtypes, &PyList_Type,
                          &shapes, &destination))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(sources);
    if (PyList_GET_SIZE(dtypes) != count || PyList_GET_SIZE(shapes) != count) {
        PyBuffer_Release(&destination);
        PyErr_SetString(PyExc_ValueError, "gather: sources, dtypes and shapes differ in length");
        return NULL;
    }
    Py_ssize_t position = 0;
    int ok = 1;
    for (Py_ssize_t i = 0; i < count && ok; i++) {
        PyObject *source = PyList_GET_ITEM(sources, i), *dtype = PyList_GET_ITEM(dtypes, i);
        if (!PyArray_DescrCheck(dtype)) {
            PyBuffer_Release(&destination);
            PyErr_Format(PyExc_TypeError, "gather: dtypes[%zd] is not a numpy dtype", i);
            return NULL;
        }
        char *data;
        Py_ssize_t nbytes;
        if (!plain_array(source, 0, &data, &nbytes))
            ok = 0; /* not a contiguous numpy array: the general path says what it is */
        else {
            PyArray_Descr *have = PyArray_DESCR((PyArrayObject *)source);
            int shaped = has_shape((PyArrayObject *)source, PyList_GET_ITEM(shapes, i));
            if (shaped < 0) {
                PyBuffer_Release(&destination);
                return NULL;
            }
            ok = shaped && (have == (PyArray_Descr *)dtype || PyArray_EquivTypes(have, (PyArray_Descr *)dtype))
                 && nbytes <= destination.len - position;
        }
        if (ok) {
            memcpy((char *)destination.buf + position, data, (size_t)nbytes);
            position += nbytes;
        }
    }
    PyBuffer_Release(&destination);
    return PyBool_FromLong(ok);
}

static PyMethodDef methods[] = {
    {"scatter", scatter, METH_VARARGS, scatter_doc},
    {"gather", gather, METH_VARARGS, gather_doc},
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
