/* The CSV verifier's state machine in C: counts records and checks field counts, chunk by chunk.
 *
 * It reads CSV exactly as Python's csv module does with newline="" (and as pipeline/csvcheck.py's pure-Python
 * walk does): the delimiter separates fields; \n, \r\n and a bare \r end a record; a quote opens a quoted field
 * only at the start of a field, and inside one, "" is a quote and delimiters and newlines are data; a line with
 * nothing on it is not a record. Rows are numbered from 1, the header being row 1, whose field count every
 * later row must have. The scan holds no reference to the data and releases the GIL while it runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif

enum { PLAIN = 0, QUOTED = 1, QUOTE_SEEN = 2 };
enum { ORDINARY = 0, DELIM = 1, QUOTE = 2, NEWLINE = 3 };

typedef struct {
    PyObject_HEAD
    unsigned char cls[256]; /* byte -> ORDINARY / DELIM / QUOTE / NEWLINE */
    unsigned char delim;
    int state;              /* PLAIN, QUOTED or QUOTE_SEEN */
    int at_field_start;     /* the next byte begins a field (a quote there opens a quoted field) */
    int row_nonblank;       /* the current row has a byte that is not a record end */
    long long row_delims;   /* delimiters outside quotes in the current row */
    long long rows;         /* non-blank rows completed, header included */
    long long columns;      /* the header's field count (0 until the header is complete) */
    int busy;               /* a scan is running (the GIL is released): refuse a concurrent one */
} Scanner;

/* Rows whose field count differs from the header's, collected during one scan (at most `cap`). */
typedef struct {
    long long *row;
    long long *fields;
    Py_ssize_t n, cap, seen;
} BadRows;

static inline void end_row(Scanner *s, BadRows *bad) {
    long long fields = s->row_delims + 1;
    s->rows++;
    if (s->rows == 1) {
        s->columns = fields;
    } else if (fields != s->columns) {
        if (bad->n < bad->cap) {
            bad->row[bad->n] = s->rows;
            bad->fields[bad->n] = fields;
            bad->n++;
        }
        bad->seen++;
    }
    s->row_delims = 0;
    s->row_nonblank = 0;
}

#ifdef __SSE2__
/* From p[i], skip 16 bytes at a time while none is a quote or a record end, counting delimiters; returns
 * the new i (a quote or record end, or fewer than 16 bytes left). fs and nb are updated for skipped bytes. */
static ALWAYS_INLINE Py_ssize_t skip_plain(const Scanner *s, const unsigned char *p, Py_ssize_t i, Py_ssize_t n,
                                    long long *delims, int *fs, int *nb) {
    const __m128i vd = _mm_set1_epi8((char)s->delim), vq = _mm_set1_epi8('"');
    const __m128i vn = _mm_set1_epi8('\n'), vr = _mm_set1_epi8('\r');
    while (i + 16 <= n) {
        __m128i v = _mm_loadu_si128((const __m128i *)(p + i));
        unsigned md = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v, vd));
        unsigned ms = (unsigned)_mm_movemask_epi8(
            _mm_or_si128(_mm_cmpeq_epi8(v, vq), _mm_or_si128(_mm_cmpeq_epi8(v, vn), _mm_cmpeq_epi8(v, vr))));
        unsigned k = ms ? (unsigned)__builtin_ctz(ms) : 16;
        if (k) {
            unsigned below = md & ((1u << k) - 1);
            *delims += __builtin_popcount(below);
            *fs = (below >> (k - 1)) & 1;
            *nb = 1;
            i += k;
        }
        if (ms)
            break;
    }
    return i;
}
#endif

/* The whole machine over data[0:n]; state carries over between calls, so chunks may split anywhere. */
static ALWAYS_INLINE void scan_body(Scanner *s, const unsigned char *p, Py_ssize_t n,
                                                            BadRows *bad) {
    Py_ssize_t i = 0;
    int fs = s->at_field_start, nb = s->row_nonblank;
    long long delims = s->row_delims;

    while (i < n) {
        if (s->state == QUOTED) { /* skip to the next quote: it closes the field or starts an escaped "" */
            const unsigned char *q = memchr(p + i, '"', (size_t)(n - i));
            if (q == NULL)
                break;
            i = (q - p) + 1;
            s->state = QUOTE_SEEN;
            continue;
        }
        if (s->state == QUOTE_SEEN) {
            if (p[i] == '"') { /* an escaped quote: still inside the field */
                s->state = QUOTED;
                i++;
                continue;
            }
            s->state = PLAIN; /* it was the closing quote: what follows is unquoted, and not a field start */
            fs = 0;
        }
        /* PLAIN */
#ifdef __SSE2__
        i = skip_plain(s, p, i, n, &delims, &fs, &nb);
        if (i >= n)
            break;
#endif
        switch (s->cls[p[i++]]) {
        case ORDINARY:
            fs = 0;
            nb = 1;
            break;
        case DELIM:
            delims++;
            fs = 1;
            nb = 1;
            break;
        case NEWLINE: /* \n or \r: a record end (\r\n makes one more line, a blank one, which is no row) */
            if (nb) {
                s->row_delims = delims;
                end_row(s, bad);
                delims = 0;
                nb = 0;
            }
            fs = 1;
            break;
        default: /* QUOTE: it opens a quoted field at a field start; elsewhere it is data */
            nb = 1;
            if (fs)
                s->state = QUOTED;
            fs = 0;
            break;
        }
    }
    s->at_field_start = fs;
    s->row_nonblank = nb;
    s->row_delims = delims;
}

/* The same code compiled twice on x86-64: with the POPCNT instruction (every x86-64 CPU since about 2008; about
 * 30% faster here than the portable bit-twiddling popcount) and without it; PyInit picks one. */
typedef void (*scan_fn)(Scanner *, const unsigned char *, Py_ssize_t, BadRows *);
static void scan_portable(Scanner *s, const unsigned char *p, Py_ssize_t n, BadRows *bad) { scan_body(s, p, n, bad); }
#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_POPCNT_VARIANT 1
__attribute__((target("popcnt"))) static void scan_popcnt(Scanner *s, const unsigned char *p, Py_ssize_t n,
                                                            BadRows *bad) {
    scan_body(s, p, n, bad);
}
#endif
static scan_fn scan = scan_portable;

static int Scanner_init(Scanner *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"delimiter", NULL};
    int delim;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i", kwlist, &delim))
        return -1;
    if (delim < 1 || delim > 255 || delim == '"' || delim == '\n' || delim == '\r') {
        PyErr_SetString(PyExc_ValueError, "delimiter must be a byte other than NUL, '\"', '\\n' and '\\r'");
        return -1;
    }
    memset(self->cls, ORDINARY, sizeof self->cls);
    self->delim = (unsigned char)delim;
    self->cls[self->delim] = DELIM;
    self->cls['"'] = QUOTE;
    self->cls['\n'] = NEWLINE;
    self->cls['\r'] = NEWLINE;
    self->state = PLAIN;
    self->at_field_start = 1;
    self->row_nonblank = 0;
    self->row_delims = 0;
    self->rows = 0;
    self->columns = 0;
    self->busy = 0;
    return 0;
}

PyDoc_STRVAR(feed_doc,
             "feed(data, max_bad) -> (bad_rows, more)\n\n"
             "Scan the next chunk (any bytes-like object). Returns up to max_bad (row number, field count)\n"
             "pairs for rows whose field count differs from the header's, and how many more such rows there were.");

static PyObject *Scanner_feed(Scanner *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t cap;
    if (!PyArg_ParseTuple(args, "y*n", &view, &cap))
        return NULL;
    if (self->busy) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_RuntimeError, "Scanner.feed() is already running");
        return NULL;
    }
    if (cap < 0)
        cap = 0;
    BadRows bad = {NULL, NULL, 0, cap, 0};
    if (cap > 0) {
        bad.row = PyMem_Malloc(sizeof(long long) * (size_t)cap);
        bad.fields = PyMem_Malloc(sizeof(long long) * (size_t)cap);
        if (bad.row == NULL || bad.fields == NULL) {
            PyMem_Free(bad.row);
            PyMem_Free(bad.fields);
            PyBuffer_Release(&view);
            return PyErr_NoMemory();
        }
    }
    self->busy = 1;
    if (view.len >= 65536) {
        Py_BEGIN_ALLOW_THREADS scan(self, (const unsigned char *)view.buf, view.len, &bad);
        Py_END_ALLOW_THREADS
    } else {
        scan(self, (const unsigned char *)view.buf, view.len, &bad);
    }
    self->busy = 0;
    PyBuffer_Release(&view);

    PyObject *list = PyList_New(bad.n);
    for (Py_ssize_t k = 0; list != NULL && k < bad.n; k++) {
        PyObject *pair = Py_BuildValue("(LL)", bad.row[k], bad.fields[k]);
        if (pair == NULL) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, k, pair);
    }
    PyMem_Free(bad.row);
    PyMem_Free(bad.fields);
    if (list == NULL)
        return NULL;
    return Py_BuildValue("(Nn)", list, bad.seen - bad.n);
}

PyDoc_STRVAR(finish_doc,
             "finish() -> (ends_in_quoted_field, (row, fields) or None)\n\n"
             "End of input: close a last row that has no record end. Returns whether the input ended inside\n"
             "a quoted field, and that last row when its field count differs from the header's.");

static PyObject *Scanner_finish(Scanner *self, PyObject *Py_UNUSED(ignored)) {
    long long row[1], fields[1];
    BadRows bad = {row, fields, 0, 1, 0};
    int open_quote = self->state == QUOTED;
    if (self->state == QUOTE_SEEN)
        self->state = PLAIN;
    if (self->row_nonblank)
        end_row(self, &bad);
    if (bad.n)
        return Py_BuildValue("(O(LL))", open_quote ? Py_True : Py_False, row[0], fields[0]);
    return Py_BuildValue("(OO)", open_quote ? Py_True : Py_False, Py_None);
}

static PyObject *Scanner_get_rows(Scanner *self, void *closure) { return PyLong_FromLongLong(self->rows); }
static PyObject *Scanner_get_columns(Scanner *self, void *closure) { return PyLong_FromLongLong(self->columns); }

static PyMethodDef Scanner_methods[] = {
    {"feed", (PyCFunction)Scanner_feed, METH_VARARGS, feed_doc},
    {"finish", (PyCFunction)Scanner_finish, METH_NOARGS, finish_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Scanner_getset[] = {
    {"rows", (getter)Scanner_get_rows, NULL, "non-blank rows completed, header included", NULL},
    {"columns", (getter)Scanner_get_columns, NULL, "the header's field count (0 until it is complete)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pipeline._csvscan.Scanner",
    .tp_doc = PyDoc_STR("Scanner(delimiter): the CSV record/field-count state machine."),
    .tp_basicsize = sizeof(Scanner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Scanner_init,
    .tp_methods = Scanner_methods,
    .tp_getset = Scanner_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pipeline._csvscan",
    .m_doc = PyDoc_STR("C state machine behind pipeline.csvcheck.CsvVerifier."),
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__csvscan(void) {
#ifdef HAVE_POPCNT_VARIANT
    __builtin_cpu_init();
    if (__builtin_cpu_supports("popcnt"))
        scan = scan_popcnt;
#endif
    if (PyType_Ready(&ScannerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ScannerType);
    if (PyModule_AddObject(m, "Scanner", (PyObject *)&ScannerType) < 0) {
        Py_DECREF(&ScannerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
