/* The InferenceEvent encoder's common case, compiled.
 *
 * encode_inference() writes the same bytes as EventEncoder.inference in events.py for
 * inputs made of plain dicts, str, float, int and None, and returns None for anything
 * else (a NaN, a numpy scalar, an unsupported type, an overflow...) so that the Python
 * encoder handles, and rejects with its reason, every other input. Keeping the fallback
 * means this file carries no validation rules of its own beyond "is this the plain case".
 *
 * Why compiled: in a service the emit path runs with cold caches, where each Python
 * bytecode costs 3-4x its tight-loop time; one C call touches far less (docs/producer.md).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    char *data;
    Py_ssize_t len, cap;
    char local[2048];
} Buf;

static void buf_init(Buf *b) { b->data = b->local; b->len = 0; b->cap = sizeof b->local; }

static void buf_free(Buf *b) { if (b->data != b->local) PyMem_Free(b->data); }

static int buf_reserve(Buf *b, Py_ssize_t extra) {
    if (b->len + extra <= b->cap) return 0;
    Py_ssize_t cap = b->cap * 2;
    while (cap < b->len + extra) cap *= 2;
    char *data = PyMem_Malloc(cap);
    if (data == NULL) { PyErr_NoMemory(); return -1; }
    memcpy(data, b->data, b->len);
    buf_free(b);
    b->data = data;
    b->cap = cap;
    return 0;
}

static int put_bytes(Buf *b, const char *src, Py_ssize_t n) {
    if (buf_reserve(b, n) < 0) return -1;
    memcpy(b->data + b->len, src, n);
    b->len += n;
    return 0;
}

static int put_byte(Buf *b, char c) { return put_bytes(b, &c, 1); }

/* Avro long: zig-zag, then base-128 varint. */
static int put_long(Buf *b, int64_t n) {
    uint64_t z = ((uint64_t)n << 1) ^ (uint64_t)(n >> 63);
    if (buf_reserve(b, 10) < 0) return -1;
    while (z > 0x7F) {
        b->data[b->len++] = (char)((z & 0x7F) | 0x80);
        z >>= 7;
    }
    b->data[b->len++] = (char)z;
    return 0;
}

static int put_double(Buf *b, double x) {
    if (buf_reserve(b, 8) < 0) return -1;
    if (PyFloat_Pack8(x, b->data + b->len, 1) < 0) return -1;
    b->len += 8;
    return 0;
}

/* Avro string of a str; 1 when it has no UTF-8 form (lone surrogate): not the plain case. */
static int put_str(Buf *b, PyObject *s) {
    Py_ssize_t n;
    const char *utf8 = PyUnicode_AsUTF8AndSize(s, &n);
    if (utf8 == NULL) { PyErr_Clear(); return 1; }
    if (put_long(b, n) < 0 || put_bytes(b, utf8, n) < 0) return -1;
    return 0;
}

/* A real number as a finite double: 0 ok, 1 not the plain case. */
static int finite_number(PyObject *v, double *out) {
    if (PyFloat_Check(v)) {
        *out = PyFloat_AS_DOUBLE(v);
    } else if (PyLong_Check(v)) {
        *out = PyLong_AsDouble(v);
        if (*out == -1.0 && PyErr_Occurred()) { PyErr_Clear(); return 1; }
    } else {
        return 1;
    }
    return isfinite(*out) ? 0 : 1;
}

enum { OK = 0, FALLBACK = 1, FAILED = -1 };
enum { NUM, CAT, NUL, KINDS };

static int feature_kind(PyObject *v) {
    if (v == Py_None) return NUL;
    if (PyUnicode_Check(v)) return CAT;
    if (PyFloat_Check(v) || PyLong_Check(v)) return NUM;
    return -1;
}

/* num_features, cat_features, null_features: three blocks, entries in dict order. */
static int put_features(Buf *b, PyObject *features) {
    if (features == Py_None) return put_bytes(b, "\0\0\0", 3);
    if (!PyDict_CheckExact(features)) return FALLBACK;
    Py_ssize_t count[KINDS] = {0, 0, 0}, pos = 0;
    PyObject *name, *value;
    while (PyDict_Next(features, &pos, &name, &value)) {
        int kind = feature_kind(value);
        if (kind < 0 || !PyUnicode_CheckExact(name)) return FALLBACK;
        count[kind]++;
    }
    for (int kind = NUM; kind < KINDS; kind++) {
        if (count[kind] && put_long(b, count[kind]) < 0) return FAILED;
        for (pos = 0; PyDict_Next(features, &pos, &name, &value);) {
            if (feature_kind(value) != kind) continue;
            int r = put_str(b, name);
            if (r != OK) return r;
            if (kind == NUM) {
                double x;
                if (finite_number(value, &x) != OK) return FALLBACK; /* NaN is "missing" */
                if (put_double(b, x) < 0) return FAILED;
            } else if (kind == CAT && (r = put_str(b, value)) != OK) {
                return r;
            }
        }
        if (put_byte(b, 0) < 0) return FAILED;
    }
    return OK;
}

/* map<double> (str -> finite number: the probabilities) or map<string> (str -> str: the
 * context); an empty or absent map is one 0 byte. Context keys must be exact str, as in
 * events.py; probability keys may be str subclasses there too. */
static int put_map(Buf *b, PyObject *map, int doubles) {
    if (map == NULL || map == Py_None) return put_byte(b, 0);
    if (!PyDict_CheckExact(map)) return FALLBACK;
    Py_ssize_t n = PyDict_GET_SIZE(map), pos = 0;
    if (n == 0) return put_byte(b, 0);
    if (put_long(b, n) < 0) return FAILED;
    PyObject *key, *value;
    while (PyDict_Next(map, &pos, &key, &value)) {
        double x = 0.0;
        int valid = doubles ? PyUnicode_Check(key) && finite_number(value, &x) == OK
                            : PyUnicode_CheckExact(key) && PyUnicode_Check(value);
        if (!valid) return FALLBACK;
        int r = put_str(b, key);
        if (r == OK) r = doubles ? (put_double(b, x) < 0 ? FAILED : OK) : put_str(b, value);
        if (r != OK) return r;
    }
    return put_byte(b, 0);
}

/* ["null", "string"] union of None or a str (not a subclass, as in events.py). */
static int put_optional_str(Buf *b, PyObject *s) {
    if (s == NULL || s == Py_None) return put_byte(b, 0);
    if (!PyUnicode_CheckExact(s)) return FALLBACK;
    if (put_byte(b, 2) < 0) return FAILED;
    return put_str(b, s);
}

/* ["null", "double"] union of None or a finite float. */
static int put_optional_double(Buf *b, PyObject *v) {
    if (v == NULL || v == Py_None) return put_byte(b, 0);
    double x;
    if (!PyFloat_Check(v) || finite_number(v, &x) != OK) return FALLBACK;
    if (put_byte(b, 2) < 0) return FAILED;
    return put_double(b, x);
}

/* The Output record: a str label, a float value, or a dict of label/probabilities/value. */
static int put_output(Buf *b, PyObject *output) {
    if (PyUnicode_CheckExact(output)) {
        int r = put_optional_str(b, output);
        return r != OK ? r : put_bytes(b, "\0\0", 2); /* no probabilities, null value */
    }
    if (PyFloat_CheckExact(output)) {
        if (put_bytes(b, "\0\0", 2) < 0) return FAILED;
        return put_optional_double(b, output);
    }
    if (!PyDict_CheckExact(output) || PyDict_GET_SIZE(output) == 0) return FALLBACK;
    PyObject *label = NULL, *probabilities = NULL, *value = NULL, *key, *item;
    Py_ssize_t pos = 0;
    while (PyDict_Next(output, &pos, &key, &item)) {
        if (!PyUnicode_CheckExact(key)) return FALLBACK;
        if (PyUnicode_CompareWithASCIIString(key, "label") == 0) label = item;
        else if (PyUnicode_CompareWithASCIIString(key, "probabilities") == 0) probabilities = item;
        else if (PyUnicode_CompareWithASCIIString(key, "value") == 0) value = item;
        else return FALLBACK;
    }
    if (label != NULL && label != Py_None && !PyUnicode_CheckExact(label)) return FALLBACK;
    int r = put_optional_str(b, label);
    if (r == OK) r = put_map(b, probabilities, 1);
    if (r == OK) r = put_optional_double(b, value);
    return r;
}

static PyObject *encode_inference(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "encode_inference takes 10 arguments");
        return NULL;
    }
    PyObject *header = args[0], *request_id = args[1], *features = args[2], *output = args[3],
             *model_version = args[4], *latency = args[5], *context = args[6],
             *event_time = args[7], *inclusion_prob = args[8], *trace_id = args[9];
    if (!PyBytes_CheckExact(header) || !PyBytes_CheckExact(request_id)
        || !PyBytes_CheckExact(model_version) || !PyLong_CheckExact(event_time)
        || !PyFloat_CheckExact(inclusion_prob)) {
        Py_RETURN_NONE;
    }
    int overflow;
    long long ms = PyLong_AsLongLongAndOverflow(event_time, &overflow);
    double latency_ms;
    if (overflow || (ms == -1 && PyErr_Occurred()) || finite_number(latency, &latency_ms) != OK) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    Buf b;
    buf_init(&b);
    int r = put_bytes(&b, PyBytes_AS_STRING(header), PyBytes_GET_SIZE(header));
    if (r == OK) r = put_long(&b, PyBytes_GET_SIZE(request_id));
    if (r == OK) r = put_bytes(&b, PyBytes_AS_STRING(request_id), PyBytes_GET_SIZE(request_id));
    if (r == OK) r = put_long(&b, ms);
    if (r == OK) r = put_bytes(&b, PyBytes_AS_STRING(model_version),
                               PyBytes_GET_SIZE(model_version));
    if (r == OK) r = put_features(&b, features);
    if (r == OK) r = put_output(&b, output);
    if (r == OK) r = put_double(&b, latency_ms);
    if (r == OK) r = put_map(&b, context, 0);
    if (r == OK) r = put_double(&b, PyFloat_AS_DOUBLE(inclusion_prob));
    if (r == OK) r = put_optional_str(&b, trace_id);
    PyObject *result = NULL;
    if (r == OK) {
        result = PyBytes_FromStringAndSize(b.data, b.len);
    } else if (r == FALLBACK) {
        result = Py_NewRef(Py_None);
    }
    buf_free(&b);
    return result;
}

static PyMethodDef methods[] = {
    {"encode_inference", (PyCFunction)(void (*)(void))encode_inference, METH_FASTCALL,
     "encode_inference(header, request_id, features, output, model_version, latency_ms,\n"
     "                 context, event_time, inclusion_prob, trace_id) -> bytes | None\n\n"
     "The InferenceEvent bytes for plain inputs, None for the Python encoder to handle."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_encode",
    "Compiled common case of shadowpipe.producers.events.EventEncoder.inference.", -1, methods,
};

PyMODINIT_FUNC PyInit__encode(void) { return PyModule_Create(&module); }
