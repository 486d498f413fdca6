/* kvwire._native: the per-tensor loops that Python makes cost a microsecond each.
 *
 * A layer of thousands of small tensors is sent as one buffer, joined from the engine's
 * arrays after checking each one's dtype and shape (gather, kvwire/uniform.py), and
 * received whole into one buffer, checked, and only then copied into the engine's arrays
 * (scatter, kvwire/landing.py). In Python each array costs ~0.5-1 us (attribute reads,
 * a memoryview, a slice); here it is one buffer request and one memcpy. kvwire/native.py holds the Python
 * twin used where this module was not built; both give the same bytes (tests/test_native.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

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
        Py_buffer view;
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
"gather(sources, formats, shapes, destination) -> bool\n\n"
"Copy each buffer of the list ``sources`` into ``destination`` one after the other, if\n"
"each is C-contiguous with the buffer format ``formats[i]`` and the shape ``shapes[i]``\n"
"(a tuple) and they fit; True if all were copied, False at the first that is not so\n"
"(``destination`` is then partly written: the caller discards it).");

static int
has_shape(const Py_buffer *view, PyObject *shape)
{
    if (!PyTuple_Check(shape) || PyTuple_GET_SIZE(shape) != view->ndim)
        return 0;
    for (Py_ssize_t d = 0; d < view->ndim; d++) {
        Py_ssize_t want = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape, d));
        if (want == -1 && PyErr_Occurred())
            return -1;
        if (want != view->shape[d])
            return 0;
    }
    return 1;
}

static PyObject *
gather(PyObject *module, PyObject *args)
{
    PyObject *sources, *formats, *shapes;
    Py_buffer destination;
    if (!PyArg_ParseTuple(args, "O!O!O!w*:gather", &PyList_Type, &sources, &PyList_Type, &formats, &PyList_Type,
                          &shapes, &destination))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(sources);
    if (PyList_GET_SIZE(formats) != count || PyList_GET_SIZE(shapes) != count) {
        PyBuffer_Release(&destination);
        PyErr_SetString(PyExc_ValueError, "gather: sources, formats and shapes differ in length");
        return NULL;
    }
    Py_ssize_t position = 0;
    int ok = 1;
    for (Py_ssize_t i = 0; i < count && ok; i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(PyList_GET_ITEM(sources, i), &view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
            PyErr_Clear(); /* not a contiguous buffer: the general path says what it is */
            ok = 0;
            break;
        }
        const char *format = PyUnicode_AsUTF8(PyList_GET_ITEM(formats, i));
        int shaped = format == NULL ? -1 : has_shape(&view, PyList_GET_ITEM(shapes, i));
        if (shaped < 0) {
            PyBuffer_Release(&view);
            PyBuffer_Release(&destination);
            return NULL;
        }
        ok = shaped && strcmp(view.format ? view.format : "B", format) == 0 && view.len <= destination.len - position;
        if (ok) {
            memcpy((char *)destination.buf + position, view.buf, (size_t)view.len);
            position += view.len;
        }
        PyBuffer_Release(&view);
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
    return PyModule_Create(&module);
}
