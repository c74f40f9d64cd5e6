/* The masking addon's hot loop in C: a run of DataRows judged and masked in one pass.
 *
 * mask_rows(run, ncols, wanted, shown, prefix_lengths) -> (masked | None, count, fallback)
 *
 *   run             whole DataRow messages back to back (framed by the session's relay)
 *   ncols           the plan's column count
 *   wanted          bytes, one per column (non-zero: a text column to search), or None:
 *                   then only the row pre-filter runs and every row it can't clear is
 *                   handed back
 *   shown           leading digits a masked card number keeps (6 for "pci", else 0)
 *   prefix_lengths  appliance.pan.detector.PREFIX_LENGTHS (10**6 bytes: a bit per length)
 *
 * Returns the run with every card number masked (None if nothing changed), how many were
 * masked, and the (start, end) offsets of the rows this code could not judge exactly as
 * MaskingAddon._mask_text_row would: those rows are untouched here, and the caller runs
 * them through the Python path, which masks them or raises as it always has. A row is
 * handed back when it is malformed in any way (column count, a length below -1, a value
 * past the row's end) or has a value the short path does not decide: anything but a
 * value of 13-19 ASCII digits that passes the pre-filter on its own. So this code is an
 * exact subset of the Python path, never an approximation of it.
 *
 * The pre-filter is appliance.pan.detector.may_hold_pan over the whole message, as the
 * addon applies it: digits count, ' ' '-' 'd' 'D' are skipped, anything else resets;
 * 13 counted in a row is a hit.
 *
 * Every read is bounds-checked against the buffer: a malformed run raises ValueError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MIN_DIGITS 13
#define MAX_DIGITS 19
#define PREFIX_TABLE_SIZE 1000000

static int32_t read_i32(const unsigned char *p) {
    return (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3]);
}

static int16_t read_i16(const unsigned char *p) {
    return (int16_t)(((uint16_t)p[0] << 8) | (uint16_t)p[1]);
}

/* may_hold_pan: a run of 13 digits once ' ', '-', 'd' and 'D' are dropped. */
static int prefilter_hit(const unsigned char *p, Py_ssize_t n) {
    int run = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        if (c >= '0' && c <= '9') {
            if (++run >= MIN_DIGITS)
                return 1;
        } else if (c != ' ' && c != '-' && c != 'd' && c != 'D') {
            run = 0;
        }
    }
    return 0;
}

/* is_pan_digits for a value already known to be 13-19 ASCII digits. */
static int pan_digits(const unsigned char *p, Py_ssize_t n, const unsigned char *table) {
    long prefix = 0;
    for (int i = 0; i < 6; i++)
        prefix = prefix * 10 + (p[i] - '0');
    if (!((table[prefix] >> (n - MIN_DIGITS)) & 1))
        return 0;
    int sum = 0;
    int doubled_parity = (int)(n & 1);  /* Luhn doubles every second digit from the right */
    for (Py_ssize_t i = 0; i < n; i++) {
        int d = p[i] - '0';
        if ((int)(i & 1) == doubled_parity) {
            d *= 2;
            if (d > 9)
                d -= 9;
        }
        sum += d;
    }
    return sum % 10 == 0;
}

typedef struct {
    Py_ssize_t *starts;  /* value start of each card number found in the current row */
    Py_ssize_t *lengths;
    Py_ssize_t used, size;
} Marks;

static int marks_push(Marks *m, Py_ssize_t start, Py_ssize_t length) {
    if (m->used == m->size) {
        Py_ssize_t size = m->size ? m->size * 2 : 16;
        Py_ssize_t *s = PyMem_Realloc(m->starts, (size_t)size * sizeof(Py_ssize_t));
        if (s == NULL) {
            PyErr_NoMemory();  /* the caller returns NULL: an exception must be set */
            return -1;
        }
        m->starts = s;
        Py_ssize_t *l = PyMem_Realloc(m->lengths, (size_t)size * sizeof(Py_ssize_t));
        if (l == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        m->lengths = l;
        m->size = size;
    }
    m->starts[m->used] = start;
    m->lengths[m->used] = length;
    m->used++;
    return 0;
}

enum { ROW_CLEAN = 0, ROW_FALLBACK = 1, ROW_ERROR = -1 };

/* Judge one row buf[p:e] that the pre-filter did not clear; its card numbers go to marks. */
static int judge_row(const unsigned char *buf, Py_ssize_t p, Py_ssize_t e, Py_ssize_t ncols,
                     const unsigned char *wanted, const unsigned char *table, Marks *marks) {
    marks->used = 0;
    if (e - p < 7)
        return ROW_FALLBACK;
    if ((Py_ssize_t)read_i16(buf + p + 5) != ncols)
        return ROW_FALLBACK;
    Py_ssize_t q = p + 7;
    for (Py_ssize_t i = 0; i < ncols; i++) {
        if (e - q < 4)
            return ROW_FALLBACK;
        int32_t length = read_i32(buf + q);
        Py_ssize_t start = q + 4;
        if (length < -1)
            return ROW_FALLBACK;
        if (length <= 0) {
            q = start;
            continue;
        }
        if ((Py_ssize_t)length > e - start)
            return ROW_FALLBACK;
        q = start + length;
        if (length < MIN_DIGITS || !wanted[i])
            continue;
        const unsigned char *value = buf + start;
        int digits = length <= MAX_DIGITS;
        for (int32_t k = 0; digits && k < length; k++)
            digits = value[k] >= '0' && value[k] <= '9';
        if (digits) {
            if (pan_digits(value, length, table) && marks_push(marks, start, length) < 0)
                return ROW_ERROR;
            continue;
        }
        if (prefilter_hit(value, length))
            return ROW_FALLBACK;  /* may hold a card number among other text: the full detector */
    }
    return ROW_CLEAN;
}

static PyObject *mask_rows(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer run, table;
    Py_ssize_t ncols, shown;
    PyObject *wanted_obj;
    if (!PyArg_ParseTuple(args, "y*nOny*", &run, &ncols, &wanted_obj, &shown, &table))
        return NULL;
    PyObject *out = NULL, *fallback = NULL, *result = NULL;
    Marks marks = {NULL, NULL, 0, 0};
    Py_buffer wanted = {0};
    int have_wanted = 0;
    const unsigned char *buf = run.buf;
    Py_ssize_t n = run.len;
    Py_ssize_t count = 0;
    unsigned char *dst = NULL;
    Py_ssize_t p = 0;

    if (table.len != PREFIX_TABLE_SIZE) {
        PyErr_SetString(PyExc_ValueError, "prefix_lengths must have 10**6 entries");
        goto done;
    }
    if (ncols < 0 || shown < 0 || shown > 6) {
        PyErr_SetString(PyExc_ValueError, "bad ncols or shown");
        goto done;
    }
    if (wanted_obj != Py_None) {
        if (PyObject_GetBuffer(wanted_obj, &wanted, PyBUF_SIMPLE) < 0)
            goto done;
        have_wanted = 1;
        if (wanted.len != ncols) {
            PyErr_SetString(PyExc_ValueError, "wanted must have one byte per column");
            goto done;
        }
    }
    fallback = PyList_New(0);
    if (fallback == NULL)
        goto done;
    while (p < n) {
        if (n - p < 5) {
            PyErr_SetString(PyExc_ValueError, "a run of rows ends inside a message header");
            goto done;
        }
        int32_t length = read_i32(buf + p + 1);
        if (length < 4 || (Py_ssize_t)length > n - p - 1) {
            PyErr_SetString(PyExc_ValueError, "a message's length runs past the run of rows");
            goto done;
        }
        Py_ssize_t e = p + 1 + length;
        if (prefilter_hit(buf + p, e - p)) {
            int verdict = have_wanted ? judge_row(buf, p, e, ncols, wanted.buf, table.buf, &marks) : ROW_FALLBACK;
            if (verdict == ROW_ERROR)
                goto done;
            if (verdict == ROW_FALLBACK) {
                PyObject *span = Py_BuildValue("(nn)", p, e);
                if (span == NULL || PyList_Append(fallback, span) < 0) {
                    Py_XDECREF(span);
                    goto done;
                }
                Py_DECREF(span);
            } else if (marks.used) {
                if (out == NULL) {
                    out = PyBytes_FromStringAndSize((const char *)buf, n);
                    if (out == NULL)
                        goto done;
                    dst = (unsigned char *)PyBytes_AS_STRING(out);
                }
                for (Py_ssize_t k = 0; k < marks.used; k++) {
                    /* the hidden middle: all but the shown head and the last four */
                    Py_ssize_t from = marks.starts[k] + shown, to = marks.starts[k] + marks.lengths[k] - 4;
                    if (to > from)
                        memset(dst + from, '*', (size_t)(to - from));
                }
                count += marks.used;
            }
        }
        p = e;
    }
    result = Py_BuildValue("(OnO)", out ? out : Py_None, count, fallback);

done:
    Py_XDECREF(out);
    Py_XDECREF(fallback);
    PyMem_Free(marks.starts);
    PyMem_Free(marks.lengths);
    if (have_wanted)
        PyBuffer_Release(&wanted);
    PyBuffer_Release(&run);
    PyBuffer_Release(&table);
    return result;
}

/* number_mask of a card number of n digits at p, written to out: "pci" keeps the first
 * six and last four digits with zeros between (the last hidden one set to 1 if that would
 * pass Luhn); "last4" writes 9, zeros, the last four. */
static void number_mask(const unsigned char *p, Py_ssize_t n, int pci, unsigned char *out) {
    if (pci) {
        memcpy(out, p, 6);
        memset(out + 6, '0', (size_t)(n - 10));
        memcpy(out + n - 4, p + n - 4, 4);
        int sum = 0, doubled_parity = (int)(n & 1);
        for (Py_ssize_t i = 0; i < n; i++) {
            int d = out[i] - '0';
            if ((int)(i & 1) == doubled_parity) {
                d *= 2;
                if (d > 9)
                    d -= 9;
            }
            sum += d;
        }
        if (sum % 10 == 0)  /* the prefix is an issuer's for this length: it would be a PAN */
            out[n - 5] = '1';
    } else {
        out[0] = '9';
        memset(out + 1, '0', (size_t)(n - 5));
        memcpy(out + n - 4, p + n - 4, 4);
    }
}

/* One COPY text row (or several) at buf[0:n], as TextScanner.take_line masks it with
 * numbers=True, for the shape judged exactly here: fields split by tab or newline, each
 * either a bare number of 13-19 digits (a card number there is a lone, bare span with
 * nothing around it that _context_ok or _bare looks at, so it is masked as a number) or a
 * field the pre-filter clears. Card numbers are masked into dst (a copy of buf) once
 * *out_needed says dst exists; returns the count, or -1: undecided (a field with another
 * digit run the pre-filter can't clear, a comma: money, a "\x": bytea hex), -2: no memory.
 * dst is written only for rows that are decided, after the whole row is. */
static Py_ssize_t copy_line(const unsigned char *buf, Py_ssize_t n, int pci, const unsigned char *table,
                            Marks *marks) {
    marks->used = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (buf[i] == ',' || (buf[i] == '\\' && i + 1 < n && buf[i + 1] == 'x'))
            return -1;
    }
    Py_ssize_t a = 0;
    while (a < n) {
        Py_ssize_t b = a;
        while (b < n && buf[b] != '\t' && buf[b] != '\n')
            b++;
        Py_ssize_t len = b - a;
        int digits = len >= MIN_DIGITS && len <= MAX_DIGITS;
        for (Py_ssize_t k = a; digits && k < b; k++)
            digits = buf[k] >= '0' && buf[k] <= '9';
        if (digits) {
            if (pan_digits(buf + a, len, table) && marks_push(marks, a, len) < 0)
                return -2;
        } else if (prefilter_hit(buf + a, len)) {
            return -1;
        }
        a = b + 1;
    }
    (void)pci;
    return marks->used;
}

static void apply_number_masks(const unsigned char *src, unsigned char *dst, int pci, const Marks *marks) {
    for (Py_ssize_t k = 0; k < marks->used; k++)
        number_mask(src + marks->starts[k], marks->lengths[k], pci, dst + marks->starts[k]);
}

/* mask_copy_line(line, pci, prefix_lengths) -> (masked | None, count) | None (undecided) */
static PyObject *mask_copy_line(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer line, table;
    int pci;
    if (!PyArg_ParseTuple(args, "y*py*", &line, &pci, &table))
        return NULL;
    PyObject *out = NULL, *result = NULL;
    Marks marks = {NULL, NULL, 0, 0};
    if (table.len != PREFIX_TABLE_SIZE) {
        PyErr_SetString(PyExc_ValueError, "prefix_lengths must have 10**6 entries");
        goto done;
    }
    Py_ssize_t count = copy_line(line.buf, line.len, pci, table.buf, &marks);
    if (count == -2)
        goto done;  /* marks_push set MemoryError */
    if (count < 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    if (count) {
        out = PyBytes_FromStringAndSize(line.buf, line.len);
        if (out == NULL)
            goto done;
        apply_number_masks(line.buf, (unsigned char *)PyBytes_AS_STRING(out), pci, &marks);
    }
    result = Py_BuildValue("(On)", out ? out : Py_None, count);
done:
    Py_XDECREF(out);
    PyMem_Free(marks.starts);
    PyMem_Free(marks.lengths);
    PyBuffer_Release(&line);
    PyBuffer_Release(&table);
    return result;
}

/* mask_copy_run(run, start, pci, prefix_lengths) -> (masked | None, count, upto)
 *
 * CopyData messages back to back in run[start:], each a COPY text row as CopyMasker.message
 * would take it once the text scanner is between rows: a body ending with a newline and
 * holding no comma is clean if the pre-filter clears it (CopyMasker._clean), else decided
 * by copy_line (take_line). Stops at the first message that is not such a row (upto: its
 * offset; len(run) when all were). masked: run[start:] with the decided rows' card
 * numbers masked (only the part before upto is meaningful), None if nothing changed.
 * A run that is not whole messages raises ValueError. */
static PyObject *mask_copy_run(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer run, table;
    Py_ssize_t start;
    int pci;
    if (!PyArg_ParseTuple(args, "y*npy*", &run, &start, &pci, &table))
        return NULL;
    PyObject *out = NULL, *result = NULL;
    Marks marks = {NULL, NULL, 0, 0};
    const unsigned char *buf = run.buf;
    Py_ssize_t n = run.len, p = start, count = 0;
    if (table.len != PREFIX_TABLE_SIZE) {
        PyErr_SetString(PyExc_ValueError, "prefix_lengths must have 10**6 entries");
        goto done;
    }
    if (start < 0 || start > n) {
        PyErr_SetString(PyExc_ValueError, "start is outside the run");
        goto done;
    }
    while (p < n) {
        if (n - p < 5) {
            PyErr_SetString(PyExc_ValueError, "a run of messages ends inside a message header");
            goto done;
        }
        int32_t length = read_i32(buf + p + 1);
        if (length < 4 || (Py_ssize_t)length > n - p - 1) {
            PyErr_SetString(PyExc_ValueError, "a message's length runs past the run");
            goto done;
        }
        const unsigned char *body = buf + p + 5;
        Py_ssize_t size = (Py_ssize_t)length - 4;
        if (size == 0 || body[size - 1] != '\n' || memchr(body, ',', (size_t)size) != NULL)
            break;
        if (prefilter_hit(body, size)) {
            Py_ssize_t found = copy_line(body, size, pci, table.buf, &marks);
            if (found == -2)
                goto done;
            if (found < 0)
                break;
            if (found) {
                if (out == NULL) {
                    out = PyBytes_FromStringAndSize((const char *)buf + start, n - start);
                    if (out == NULL)
                        goto done;
                }
                apply_number_masks(body, (unsigned char *)PyBytes_AS_STRING(out) + (p + 5 - start), pci, &marks);
                count += found;
            }
        }
        p += 1 + (Py_ssize_t)length;
    }
    result = Py_BuildValue("(Onn)", out ? out : Py_None, count, p);
done:
    Py_XDECREF(out);
    PyMem_Free(marks.starts);
    PyMem_Free(marks.lengths);
    PyBuffer_Release(&run);
    PyBuffer_Release(&table);
    return result;
}

static PyMethodDef methods[] = {
    {"mask_copy_run", mask_copy_run, METH_VARARGS,
     "mask_copy_run(run, start, pci, prefix_lengths) -> (masked | None, count, upto)"},
    {"mask_copy_line", mask_copy_line, METH_VARARGS,
     "mask_copy_line(line, pci, prefix_lengths) -> (masked | None, count), or None: undecided"},
    {"mask_rows", mask_rows, METH_VARARGS,
     "mask_rows(run, ncols, wanted, shown, prefix_lengths) -> (masked | None, count, fallback rows)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "appliance.masking._fastrows",
    "The masking addon's DataRow short path in C (see _fastrows.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastrows(void) {
    return PyModule_Create(&module);
}
