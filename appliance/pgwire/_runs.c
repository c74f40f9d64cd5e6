/* The session relay's run framing in C: how far a run of same-tag messages goes.
 *
 * run_end(data, pos, n, tag, low, high) -> (end, count)
 *
 * From the message at data[pos] (the caller has framed it: it is whole, of tag ``tag``,
 * and ends at ``pos``), extend over the messages that follow while each is whole within
 * data[:n], has tag ``tag`` and a length field in [low, high]; returns the end of the last
 * one taken and how many were taken after the first. The first message that is not such
 * is left to the caller's framing loop (appliance.proxy.results.ResponseRelay.feed), which
 * applies the same bounds and names the problem. Exactly the Python loop it replaces
 * (_run_end in results.py), tested identical.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static PyObject *run_end(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer data;
    Py_ssize_t end, n, low, high;
    int tag;
    if (!PyArg_ParseTuple(args, "y*nninn", &data, &end, &n, &tag, &low, &high))
        return NULL;
    if (n > data.len || n < 0 || end < 0) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "the run's bounds are outside the data");
        return NULL;
    }
    const unsigned char *buf = data.buf;
    Py_ssize_t count = 0;
    while (n - end >= 5 && buf[end] == (unsigned char)tag) {
        const unsigned char *p = buf + end + 1;
        int32_t length = (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3]);
        if (length < low || length > high || (Py_ssize_t)length > n - end - 1)
            break;
        end += 1 + (Py_ssize_t)length;
        count++;
    }
    PyBuffer_Release(&data);
    return Py_BuildValue("(nn)", end, count);
}

static PyMethodDef methods[] = {
    {"run_end", run_end, METH_VARARGS, "run_end(data, end, n, tag, low, high) -> (end, count)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "appliance.pgwire._runs",
    "The session relay's run framing in C (see _runs.c).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__runs(void) {
    return PyModule_Create(&module);
}
