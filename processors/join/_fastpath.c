/* The joiner's decode fast path (processors/join/fastpath.py), compiled.
 *
 * inference_part() and shadow_part() return exactly what the Python walkers walk_inference()
 * and walk_shadow() return: the same tuples and bytes, and None wherever they return None
 * (another header, truncation, trailing bytes, a bad union index, a negative or second map
 * block, invalid UTF-8 under Python's strict decoder). tests/test_join_compiled.py checks
 * this on valid and on mutated messages.
 *
 * One case is left to Python on purpose: numeric feature names not interned yet. The C walker
 * looks the names up in FeatureLayouts.signatures (canonical encoding of the count and names
 * -> layout id, filled by FeatureLayouts.intern_raw) and returns NotImplemented when they are
 * missing, so the Python walker interns and registers them; interning stays in one place.
 * NotImplemented also answers any `data` that is not bytes.
 *
 * Like the Python walkers, these return None for what schemas/validate.py must judge: an
 * event_time that is not positive, a numeric feature that is NaN or infinite. The Codec then
 * gives every processor the same verdict (NaN: a missing value; the rest: a reason).
 *
 * Why compiled: decoding was half of the benchmark's critical-path thread (docs/joiner.md).
 */
#include "_wire.h" /* schemas/_wire.h: the Avro primitives shared with producers/_encode.c */

#define FORMAT 0x01      /* parts.FORMAT, checked by fastpath.py at import */
#define MIN_INTERNED 4   /* parts.MIN_INTERNED, likewise */
#define MAX_FEATURES 512 /* more numeric features: left to Python (NotImplemented) */

typedef WireData Data;

/* A position, or FAIL: the message is not in the form the walkers take (they return None). */
#define FAIL WIRE_FAIL

/* A UTF-8 string (fastpath._string). */
static Py_ssize_t string(Data d, Py_ssize_t n, Py_ssize_t pos) {
    return wire_skip_string(d, n, pos);
}

/* An event time (skipped: at most 10 bytes, as fastpath._skip_long) that must be a positive
 * epoch-ms. */
static Py_ssize_t positive_time(Data d, Py_ssize_t n, Py_ssize_t pos) {
    Py_ssize_t end = wire_skip_long(d, n, pos);
    int64_t t;
    if (end == FAIL || wire_read_long(d, n, pos, &t) == FAIL || t <= 0) return FAIL;
    return end;
}

static Py_ssize_t map_string(Data d, Py_ssize_t n, Py_ssize_t pos) {
    int64_t count = 0;
    pos = wire_block(d, n, pos, &count);
    for (int64_t k = 0; k < count && pos != FAIL; k++) pos = string(d, n, string(d, n, pos));
    return wire_block_end(d, n, pos, count);
}

static Py_ssize_t map_double(Data d, Py_ssize_t n, Py_ssize_t pos) {
    int64_t count = 0;
    pos = wire_block(d, n, pos, &count);
    for (int64_t k = 0; k < count && pos != FAIL; k++)
        pos = wire_skip_double(n, string(d, n, pos));
    return wire_block_end(d, n, pos, count);
}

static Py_ssize_t array_string(Data d, Py_ssize_t n, Py_ssize_t pos) {
    int64_t count = 0;
    pos = wire_block(d, n, pos, &count);
    for (int64_t k = 0; k < count && pos != FAIL; k++) pos = string(d, n, pos);
    return wire_block_end(d, n, pos, count);
}

static Py_ssize_t output(Data d, Py_ssize_t n, Py_ssize_t pos) {
    return wire_skip_opt_double(d, n, map_double(d, n, wire_skip_opt_string(d, n, pos)));
}

/* A str of the string at pos (Python's own strict decoder); NULL with no error: invalid. */
static PyObject *decode_text(Data d, Py_ssize_t n, Py_ssize_t pos, Py_ssize_t *end) {
    Py_ssize_t at, size;
    *end = wire_text(d, n, pos, &at, &size);
    if (*end == FAIL) return NULL;
    PyObject *s = PyUnicode_DecodeUTF8((const char *)d + at, size, "strict");
    if (s == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) PyErr_Clear();
    return s;
}

static int same_header(Data d, Py_ssize_t n, PyObject *header) {
    return PyBytes_CheckExact(header) && PyBytes_GET_SIZE(header) == 10 && n >= 10
           && memcmp(d, PyBytes_AS_STRING(header), 10) == 0;
}

/* Builds a bytes object from (pointer, length) pieces. */
typedef struct {
    const void *ptr[32];
    Py_ssize_t len[32];
    int count;
    Py_ssize_t total;
} Pieces;

static void add(Pieces *p, const void *ptr, Py_ssize_t len) {
    p->ptr[p->count] = ptr;
    p->len[p->count++] = len;
    p->total += len;
}

static PyObject *joined(const Pieces *p) {
    PyObject *out = PyBytes_FromStringAndSize(NULL, p->total);
    if (out == NULL) return NULL;
    char *w = PyBytes_AS_STRING(out);
    for (int k = 0; k < p->count; k++) {
        memcpy(w, p->ptr[k], p->len[k]);
        w += p->len[k];
    }
    return out;
}

static const unsigned char ONE = FORMAT, TWO = 0x02, ZERO = 0x00;

/* The numeric features at pos (fastpath._features): one block of name -> 8-byte value. */
typedef struct {
    Py_ssize_t start, end;
    int64_t count;
    Py_ssize_t names[MAX_FEATURES]; /* position of each name's length */
} Features;

static Py_ssize_t features(Data d, Py_ssize_t n, Py_ssize_t pos, Features *f) {
    f->start = pos;
    pos = wire_block(d, n, pos, &f->count);
    if (pos == FAIL) return FAIL;
    for (int64_t k = 0; k < f->count; k++) {
        int64_t size;
        Py_ssize_t at = wire_read_long(d, n, pos, &size);
        if (at == FAIL || size < 0 || size > n - at || n - at - size < 8) return FAIL;
        if (!wire_utf8_ok(d + at, (Py_ssize_t)size)) return FAIL;
        if (wire_non_finite(d + at + size)) return FAIL;
        if (k < MAX_FEATURES) f->names[k] = pos;
        pos = at + (Py_ssize_t)size + 8;
    }
    return f->end = wire_block_end(d, n, pos, f->count);
}

/* The layout id of the names (new reference), Py_None when not interned, NULL on error. */
static PyObject *layout_id(Data d, Py_ssize_t n, const Features *f, PyObject *signatures) {
    /* canonical lengths are never longer than the message's own */
    PyObject *key = PyBytes_FromStringAndSize(NULL, 10 + (f->end - f->start));
    if (key == NULL) return NULL;
    unsigned char *w = (unsigned char *)PyBytes_AS_STRING(key), *w0 = w;
    w += wire_put_long(w, f->count);
    for (int64_t k = 0; k < f->count; k++) {
        int64_t len;
        Py_ssize_t at = wire_read_long(d, n, f->names[k], &len);
        w += wire_put_long(w, len);
        memcpy(w, d + at, (size_t)len);
        w += len;
    }
    if (_PyBytes_Resize(&key, w - w0) < 0) return NULL;
    PyObject *lid = PyDict_GetItemWithError(signatures, key);
    Py_DECREF(key);
    if (lid == NULL) return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    if (!PyBytes_CheckExact(lid) || PyBytes_GET_SIZE(lid) != 8) return Py_NewRef(Py_None);
    return Py_NewRef(lid);
}

/* The stored numeric-features block: inline, or interned (id + count + values). */
static PyObject *features_block(Data d, Py_ssize_t n, const Features *f, PyObject *signatures) {
    unsigned char prefix[11];
    if (signatures == Py_None || f->count < MIN_INTERNED) {
        Py_ssize_t raw = f->end - f->start;
        prefix[0] = ZERO;
        int k = 1 + wire_put_long(prefix + 1, raw);
        Pieces p = {.count = 0, .total = 0};
        add(&p, prefix, k);
        add(&p, d + f->start, raw);
        return joined(&p);
    }
    if (f->count > MAX_FEATURES) Py_RETURN_NOTIMPLEMENTED;
    PyObject *lid = layout_id(d, n, f, signatures);
    if (lid == NULL || lid == Py_None) {
        if (lid == Py_None) {
            Py_DECREF(lid);
            Py_RETURN_NOTIMPLEMENTED;
        }
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, 9 + 10 + 8 * f->count);
    if (out == NULL) {
        Py_DECREF(lid);
        return NULL;
    }
    unsigned char *w = (unsigned char *)PyBytes_AS_STRING(out), *w0 = w;
    *w++ = ONE;
    memcpy(w, PyBytes_AS_STRING(lid), 8);
    w += 8;
    Py_DECREF(lid);
    w += wire_put_long(w, f->count);
    for (int64_t k = 0; k < f->count; k++) {
        int64_t len;
        Py_ssize_t at = wire_read_long(d, n, f->names[k], &len);
        memcpy(w, d + at + len, 8);
        w += 8;
    }
    if (_PyBytes_Resize(&out, w - w0) < 0) return NULL;
    return out;
}

static PyObject *inference_part(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "inference_part takes 3 arguments");
        return NULL;
    }
    PyObject *data = args[0], *header = args[1], *signatures = args[2];
    if (!PyBytes_CheckExact(data) || (signatures != Py_None && !PyDict_CheckExact(signatures)))
        Py_RETURN_NOTIMPLEMENTED;
    Data d = (Data)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    if (!same_header(d, n, header)) Py_RETURN_NONE;
    Py_ssize_t time_at;
    PyObject *request_id = decode_text(d, n, 10, &time_at);
    if (request_id == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    Features f;
    Py_ssize_t head_at = positive_time(d, n, time_at);
    Py_ssize_t head_end = string(d, n, string(d, n, head_at));
    Py_ssize_t rest_at = head_end == FAIL ? FAIL : features(d, n, head_end, &f);
    Py_ssize_t out_at = array_string(d, n, map_string(d, n, rest_at));
    Py_ssize_t latency_at = out_at == FAIL ? FAIL : output(d, n, out_at);
    Py_ssize_t context_at = wire_skip_double(n, latency_at);
    Py_ssize_t prob_at = context_at == FAIL ? FAIL : map_string(d, n, context_at);
    Py_ssize_t trace_at = wire_skip_double(n, prob_at);
    Py_ssize_t end = wire_skip_opt_string(d, n, trace_at);
    if (end != n) {
        Py_DECREF(request_id);
        Py_RETURN_NONE;
    }
    PyObject *num = features_block(d, n, &f, signatures);
    if (num == NULL || num == Py_NotImplemented) {
        Py_DECREF(request_id);
        return num;
    }
    Py_ssize_t head_len = (head_end - head_at) + (prob_at - context_at);
    unsigned char head_size[10];
    Pieces p = {.count = 0, .total = 0};
    add(&p, &ONE, 1);
    add(&p, d + time_at, head_at - time_at);
    add(&p, d + prob_at, trace_at - prob_at);
    add(&p, d + trace_at, n - trace_at);
    add(&p, head_size, wire_put_long(head_size, head_len));
    add(&p, d + head_at, head_end - head_at);
    add(&p, d + context_at, prob_at - context_at);
    add(&p, PyBytes_AS_STRING(num), PyBytes_GET_SIZE(num));
    add(&p, d + rest_at, out_at - rest_at);
    add(&p, &TWO, 1);
    add(&p, d + out_at, latency_at - out_at);
    add(&p, &TWO, 1);
    add(&p, d + latency_at, context_at - latency_at);
    PyObject *part = joined(&p);
    Py_DECREF(num);
    if (part == NULL) {
        Py_DECREF(request_id);
        return NULL;
    }
    PyObject *result = PyTuple_Pack(2, request_id, part);
    Py_DECREF(request_id);
    Py_DECREF(part);
    return result;
}

static PyObject *shadow_part(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "shadow_part takes 2 arguments");
        return NULL;
    }
    PyObject *data = args[0], *header = args[1];
    if (!PyBytes_CheckExact(data)) Py_RETURN_NOTIMPLEMENTED;
    Data d = (Data)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    if (!same_header(d, n, header)) Py_RETURN_NONE;
    PyObject *request_id = NULL, *challenger = NULL, *part = NULL, *result = NULL;
    Py_ssize_t pos, version_at;
    request_id = decode_text(d, n, 10, &pos);
    if (request_id == NULL) goto done;
    challenger = decode_text(d, n, pos, &version_at);
    if (challenger == NULL) goto done;
    Py_ssize_t control_at = string(d, n, version_at);
    if (control_at == FAIL || control_at >= n || d[control_at] > 1) goto done;
    Py_ssize_t time_at = control_at + 1;
    Py_ssize_t time_end = positive_time(d, n, time_at);
    Py_ssize_t out_at = time_end == FAIL ? FAIL : wire_skip_long(d, n, time_end); /* scored_at */
    int has_output = wire_branch(d, n, out_at);
    if (has_output == FAIL) goto done;
    Py_ssize_t timings_at = has_output ? output(d, n, out_at + 1) : out_at + 1;
    Py_ssize_t error_at = wire_skip_double(n, wire_skip_double(n, timings_at));
    int has_error = wire_branch(d, n, error_at);
    Py_ssize_t end = wire_skip_opt_string(d, n, wire_skip_opt_string(d, n, error_at));
    if (end != n) goto done;
    /* Python's walker reads has_error before checking the branch; a bad one fails anyway */
    (void)has_error;
    Pieces p = {.count = 0, .total = 0};
    add(&p, &ONE, 1);
    add(&p, d + time_at, time_end - time_at);
    add(&p, d + version_at, control_at - version_at);
    add(&p, d + control_at, 1);
    add(&p, d + out_at, timings_at - out_at);
    add(&p, d + error_at, n - error_at);
    add(&p, &TWO, 1);
    add(&p, d + timings_at, 8);
    add(&p, &TWO, 1);
    add(&p, d + timings_at + 8, error_at - timings_at - 8);
    part = joined(&p);
    if (part == NULL) goto done;
    result = PyTuple_Pack(4, request_id, challenger,
                          has_output || d[error_at] != 0 ? Py_True : Py_False, part);
done:
    Py_XDECREF(request_id);
    Py_XDECREF(challenger);
    Py_XDECREF(part);
    if (result == NULL && !PyErr_Occurred()) Py_RETURN_NONE;
    return result;
}

/* -- JoinedRecord bodies (parts.build_bodies) ---------------------------------------------
 * Stored parts come from this joiner's own encoders, so anything unexpected in them (bad
 * format byte, out-of-range slice, unknown layout, a value beyond 64 bits) is answered with
 * NotImplemented: parts.build_bodies then runs in Python and raises or returns what it does. */

#define NI ((Py_ssize_t)-2) /* a position: leave this input to Python */

/* A slice [at, at + size) of d, FAIL unless it lies inside d. */
static Py_ssize_t inside(Py_ssize_t n, Py_ssize_t at, int64_t size) {
    return at == FAIL || size < 0 || size > n - at ? FAIL : at + (Py_ssize_t)size;
}

typedef struct {
    int has_primary;
    int64_t event_time;
    double prob;
    Data trace;            /* the trace id's bytes, or NULL (null) */
    Py_ssize_t trace_len;
    Data head, num, rest;  /* primary segment: head + num + rest */
    Py_ssize_t head_len, num_len, rest_len;
    unsigned char *map;    /* the interned features rebuilt as an Avro map (owned) */
} Primary;

/* parts._split_inference; 0 ok, 1 leave to Python, -1 error. */
static int split_primary(PyObject *part, PyObject *names, Primary *out) {
    if (!PyBytes_CheckExact(part)) return 1;
    Data d = (Data)PyBytes_AS_STRING(part);
    Py_ssize_t n = PyBytes_GET_SIZE(part), pos, end;
    int64_t size;
    if (n < 1 || d[0] != FORMAT) return 1;
    pos = wire_read_long(d, n, 1, &out->event_time);
    if (pos == FAIL || pos > n - 9) return 1;
    out->prob = wire_get_double(d + pos);
    pos += 8;
    out->trace = NULL;
    int has_trace = wire_branch(d, n, pos); /* the trace id: ["null", "string"] */
    if (has_trace == FAIL) return 1;
    if (has_trace) {
        pos = wire_read_long(d, n, pos + 1, &size);
        end = inside(n, pos, size);
        if (end == FAIL || !wire_utf8_ok(d + pos, end - pos)) return 1;
        out->trace = d + pos;
        out->trace_len = end - pos;
        pos = end;
    } else {
        pos++;
    }
    pos = wire_read_long(d, n, pos, &size);
    end = inside(n, pos, size);
    if (end == FAIL || end >= n) return 1;
    out->head = d + pos;
    out->head_len = end - pos;
    pos = end;
    if (d[pos] == 0) {
        pos = wire_read_long(d, n, pos + 1, &size);
        end = inside(n, pos, size);
        if (end == FAIL) return 1;
        out->num = d + pos;
        out->num_len = end - pos;
    } else {
        if (names == Py_None || pos > n - 9) return 1;
        PyObject *lid = PyBytes_FromStringAndSize((const char *)d + pos + 1, 8);
        if (lid == NULL) return -1;
        PyObject *list = PyDict_GetItemWithError(names, lid);
        Py_DECREF(lid);
        if (list == NULL) return PyErr_Occurred() ? -1 : 1;
        int64_t count;
        pos = wire_read_long(d, n, pos + 9, &count);
        if (!PyList_CheckExact(list) || pos == FAIL || count != PyList_GET_SIZE(list)
            || count > (n - pos) / 8) return 1;
        Py_ssize_t total = 11 + 8 * (Py_ssize_t)count;
        for (Py_ssize_t k = 0; k < count; k++) {
            PyObject *name = PyList_GET_ITEM(list, k);
            if (!PyBytes_CheckExact(name)) return 1;
            total += PyBytes_GET_SIZE(name);
        }
        unsigned char *w = out->map = PyMem_Malloc(total);
        if (w == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        w += wire_put_long(w, count);
        for (Py_ssize_t k = 0; k < count; k++) {
            PyObject *name = PyList_GET_ITEM(list, k);
            memcpy(w, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name));
            w += PyBytes_GET_SIZE(name);
            memcpy(w, d + pos + 8 * k, 8);
            w += 8;
        }
        *w++ = 0;
        out->num = out->map;
        out->num_len = w - out->map;
        end = pos + 8 * (Py_ssize_t)count;
    }
    out->rest = d + end;
    out->rest_len = n - end;
    out->has_primary = 1;
    return 0;
}

typedef struct {
    int has_feedback;
    int64_t label_time;
    double prob;
    Data label, source;
    Py_ssize_t label_len, source_len;
} Feedback;

/* parts._split_feedback; 0 ok, 1 leave to Python. */
static int split_feedback(PyObject *part, Feedback *out) {
    if (!PyBytes_CheckExact(part)) return 1;
    Data d = (Data)PyBytes_AS_STRING(part);
    Py_ssize_t n = PyBytes_GET_SIZE(part), pos, end;
    int64_t size;
    if (n < 1 || d[0] != FORMAT) return 1;
    pos = wire_read_long(d, n, 1, &out->label_time);
    if (pos == FAIL || pos > n - 8) return 1;
    out->prob = wire_get_double(d + pos);
    pos = wire_read_long(d, n, pos + 8, &size);
    end = inside(n, pos, size);
    if (end == FAIL) return 1;
    out->label = d + pos;
    out->label_len = end - pos;
    out->source = d + end;
    out->source_len = n - end;
    out->has_feedback = 1;
    return 0;
}

/* UTF-8 of a str or the bytes themselves; NULL: leave to Python (no error set). */
static const char *raw_text(PyObject *v, Py_ssize_t *len) {
    if (PyBytes_CheckExact(v)) {
        *len = PyBytes_GET_SIZE(v);
        return PyBytes_AS_STRING(v);
    }
    if (!PyUnicode_CheckExact(v)) return NULL;
    const char *s = PyUnicode_AsUTF8AndSize(v, len);
    if (s == NULL) PyErr_Clear();
    return s;
}

static int as_int64(PyObject *v, int64_t *out) {
    if (!PyLong_CheckExact(v)) return 0;
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow || (x == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    *out = x;
    return 1;
}

/* The optional long (["null", "long"]) in buf; returns its size. */
static int opt_long(unsigned char *buf, int known, int64_t v) {
    if (!known) {
        buf[0] = 0;
        return 1;
    }
    buf[0] = 2;
    return 1 + wire_put_long(buf + 1, v);
}

/* Everything after the shadow segment: label, delay, source, prob, joined_at, trace id. */
typedef struct {
    unsigned char delay[11], prob[8], joined[10], trace_head[11];
    int delay_len, joined_len, trace_head_len;
} Tail;

static int tail_delay(Tail *t, const Feedback *fb, int known, int64_t event_time) {
    int64_t delay = 0;
    int has = fb->has_feedback && known;
    if (has && __builtin_sub_overflow(fb->label_time, event_time, &delay)) return 1;
    t->delay_len = opt_long(t->delay, has, delay);
    return 0;
}

static void add_tail(Pieces *p, const Tail *t, const Feedback *fb, const Primary *pr) {
    static const unsigned char no_label[3] = {0, 0, 0};
    /* null source, weight 1.0 (little-endian IEEE double) */
    static const unsigned char no_source[9] = {0, 0, 0, 0, 0, 0, 0, 0xF0, 0x3F};
    if (fb->has_feedback) add(p, fb->label, fb->label_len);
    else add(p, no_label, 3);
    add(p, t->delay, t->delay_len);
    if (fb->has_feedback) add(p, fb->source, fb->source_len);
    else add(p, no_source, 9);
    add(p, t->prob, 8);
    add(p, t->joined, t->joined_len);
    add(p, t->trace_head, t->trace_head_len);
    if (pr->trace != NULL) add(p, pr->trace, pr->trace_len);
}

static PyObject *bodies(PyObject *request_id, PyObject *primary, PyObject *feedback,
                        PyObject *shadows, PyObject *joined_at, PyObject *prefix,
                        PyObject *names, Primary *pr) {
    static const unsigned char no_primary[8] = {0}, no_shadow[5] = {0}, no_version[2] = {0};
    Feedback fb = {0};
    Tail t;
    int64_t joined_ms;
    Py_ssize_t rid_len;
    const char *rid = PyUnicode_CheckExact(request_id) ? raw_text(request_id, &rid_len) : NULL;
    if (rid == NULL || !PyBytes_CheckExact(prefix) || !as_int64(joined_at, &joined_ms)
        || !(PyList_CheckExact(shadows) || PyTuple_CheckExact(shadows))
        || PySequence_Fast_GET_SIZE(shadows) % 3 != 0
        || (names != Py_None && !PyDict_CheckExact(names)))
        Py_RETURN_NOTIMPLEMENTED;
    if (primary != Py_None) {
        int r = split_primary(primary, names, pr);
        if (r < 0) return NULL;
        if (r) Py_RETURN_NOTIMPLEMENTED;
    }
    if (feedback != Py_None && split_feedback(feedback, &fb)) Py_RETURN_NOTIMPLEMENTED;
    double prob = pr->has_primary ? pr->prob : 1.0;
    if (fb.has_feedback) prob *= fb.prob;
    wire_put_double(t.prob, prob);
    t.joined_len = wire_put_long(t.joined, joined_ms);
    t.trace_head_len = 1;
    t.trace_head[0] = 0;
    if (pr->trace != NULL) {
        t.trace_head[0] = 2;
        t.trace_head_len += wire_put_long(t.trace_head + 1, pr->trace_len);
    }
    if (pr->has_primary && tail_delay(&t, &fb, 1, pr->event_time)) Py_RETURN_NOTIMPLEMENTED;
    unsigned char rid_size[10];
    int rid_size_len = wire_put_long(rid_size, rid_len);
    Py_ssize_t count = PySequence_Fast_GET_SIZE(shadows) / 3;
    PyObject **items = PySequence_Fast_ITEMS(shadows);
    PyObject *out = PyList_New(count);
    if (out == NULL) return NULL;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *challenger = items[3 * k], *version = items[3 * k + 1];
        PyObject *shadow = items[3 * k + 2];
        Py_ssize_t name_len;
        int64_t version_n, own_time = 0;
        const char *name = raw_text(challenger, &name_len);
        if (name == NULL || !as_int64(version, &version_n)
            || (shadow != Py_None && !PyBytes_CheckExact(shadow)))
            goto fallback;
        unsigned char name_size[10], version_buf[10], at[11];
        unsigned char state = !name_len ? 4 : !pr->has_primary ? 6 : fb.has_feedback ? 2 : 0;
        Data version_seg = no_version, shadow_seg = no_shadow;
        Py_ssize_t version_seg_len = 2, shadow_seg_len = 5;
        int own_known = 0;
        if (shadow != Py_None) {
            Data d = (Data)PyBytes_AS_STRING(shadow);
            Py_ssize_t n = PyBytes_GET_SIZE(shadow), pos, start;
            int64_t size;
            if (n < 1 || d[0] != FORMAT) goto fallback;
            pos = wire_skip_long(d, n, 1);
            if (pos == FAIL || pos >= n) goto fallback;
            start = wire_read_long(d, n, pos, &size); /* challenger_version's size */
            Py_ssize_t split = inside(n, start, size);
            if (split == FAIL || split >= n) goto fallback;
            version_seg = d + pos;
            version_seg_len = split + 1 - pos;
            shadow_seg = d + split + 1;
            shadow_seg_len = n - split - 1;
            if (!pr->has_primary) {
                if (wire_read_long(d, n, 1, &own_time) == FAIL) goto fallback;
                own_known = 1;
            }
        }
        int at_len = pr->has_primary ? opt_long(at, 1, pr->event_time)
                                     : opt_long(at, own_known, own_time);
        if (!pr->has_primary && tail_delay(&t, &fb, own_known, own_time)) goto fallback;
        Pieces p = {.count = 0, .total = 0};
        add(&p, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix));
        add(&p, rid_size, rid_size_len);
        add(&p, rid, rid_len);
        add(&p, name_size, wire_put_long(name_size, name_len));
        add(&p, name, name_len);
        add(&p, version_seg, version_seg_len);
        add(&p, version_buf, wire_put_long(version_buf, version_n));
        add(&p, &state, 1);
        add(&p, at, at_len);
        if (pr->has_primary) {
            add(&p, pr->head, pr->head_len);
            add(&p, pr->num, pr->num_len);
            add(&p, pr->rest, pr->rest_len);
        } else {
            add(&p, no_primary, 8);
        }
        add(&p, shadow_seg, shadow_seg_len);
        add_tail(&p, &t, &fb, pr);
        PyObject *body = joined(&p);
        if (body == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, k, body);
    }
    return out;
fallback:
    Py_DECREF(out);
    Py_RETURN_NOTIMPLEMENTED;
}

static PyObject *build_bodies(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "build_bodies takes 7 arguments");
        return NULL;
    }
    Primary pr = {0};
    PyObject *out = bodies(args[0], args[1], args[2], args[3], args[4], args[5], args[6], &pr);
    PyMem_Free(pr.map);
    return out;
}

/* -- the merge command (store.JoinStore._send) --------------------------------------------- */

typedef WireBuf Buf; /* the growable buffer of schemas/_wire.h */

/* One RESP bulk string; `second` (may be NULL) is appended to `first` (key prefix + id). */
static int bulk(Buf *b, const char *first, Py_ssize_t n1, const char *second, Py_ssize_t n2) {
    if (wire_reserve(b, n1 + n2 + 32) < 0) return -1;
    b->len += sprintf(b->data + b->len, "$%zd\r\n", n1 + n2);
    memcpy(b->data + b->len, first, n1);
    if (n2) memcpy(b->data + b->len + n1, second, n2);
    b->len += n1 + n2;
    memcpy(b->data + b->len, "\r\n", 2);
    b->len += 2;
    return 0;
}

/* An argument as hiredis.pack_command writes it: str, bytes or int; 1: another type. */
static int arg(Buf *b, PyObject *v) {
    if (PyLong_CheckExact(v)) {
        int64_t x;
        if (!as_int64(v, &x)) return 1;
        char digits[24];
        int k = sprintf(digits, "%lld", (long long)x);
        return bulk(b, digits, k, NULL, 0);
    }
    Py_ssize_t len;
    const char *s = raw_text(v, &len);
    return s == NULL ? 1 : bulk(b, s, len, NULL, 0);
}

static int pack(Buf *b, PyObject *head, PyObject *state, PyObject *tomb, PyObject *middle,
                PyObject *parts) {
    Py_ssize_t count = PyList_GET_SIZE(parts), state_len, tomb_len, rid_len;
    Py_ssize_t argc = PyTuple_GET_SIZE(head) + PyTuple_GET_SIZE(middle) + 7 * count;
    const char *state_s = raw_text(state, &state_len), *tomb_s = raw_text(tomb, &tomb_len);
    if (state_s == NULL || tomb_s == NULL || wire_reserve(b, 32) < 0) return state_s && tomb_s ? -1 : 1;
    b->len += sprintf(b->data + b->len, "*%zd\r\n", argc);
    int r = 0;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(head) && !r; k++)
        r = arg(b, PyTuple_GET_ITEM(head, k));
    for (Py_ssize_t k = 0; k < count && !r; k++) {
        PyObject *part = PyList_GET_ITEM(parts, k);
        if (!PyTuple_Check(part) || PyTuple_GET_SIZE(part) != 6) return 1;
        const char *rid = raw_text(PyTuple_GET_ITEM(part, 1), &rid_len);
        if (rid == NULL || !PyUnicode_Check(PyTuple_GET_ITEM(part, 1))) return 1;
        r = bulk(b, state_s, state_len, rid, rid_len);
        if (!r) r = bulk(b, tomb_s, tomb_len, rid, rid_len);
    }
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(middle) && !r; k++)
        r = arg(b, PyTuple_GET_ITEM(middle, k));
    static const int fields[5] = {0, 2, 3, 5, 4}; /* kind, challenger, blob, msg_id, rank */
    for (Py_ssize_t k = 0; k < count && !r; k++) {
        PyObject *part = PyList_GET_ITEM(parts, k);
        for (int f = 0; f < 5 && !r; f++) r = arg(b, PyTuple_GET_ITEM(part, fields[f]));
    }
    return r;
}

static PyObject *pack_merge(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "pack_merge takes 5 arguments");
        return NULL;
    }
    PyObject *head = args[0], *state = args[1], *tomb = args[2], *middle = args[3];
    PyObject *parts = args[4];
    if (!PyTuple_CheckExact(head) || !PyTuple_CheckExact(middle) || !PyList_CheckExact(parts)
        || !PyUnicode_CheckExact(state) || !PyUnicode_CheckExact(tomb))
        Py_RETURN_NOTIMPLEMENTED;
    Buf b;
    wire_buf_init(&b);
    int r = pack(&b, head, state, tomb, middle, parts);
    PyObject *out = r < 0 ? NULL : r ? Py_NewRef(Py_NotImplemented)
                                     : PyBytes_FromStringAndSize(b.data, b.len);
    wire_buf_free(&b);
    return out;
}

static PyMethodDef methods[] = {
    {"inference_part", (PyCFunction)(void (*)(void))inference_part, METH_FASTCALL,
     "inference_part(data, header, signatures) -> (request_id, part) | None | NotImplemented\n\n"
     "fastpath.walk_inference's result; NotImplemented: feature names not interned yet\n"
     "(signatures: FeatureLayouts.signatures, or None for no interning)."},
    {"shadow_part", (PyCFunction)(void (*)(void))shadow_part, METH_FASTCALL,
     "shadow_part(data, header) -> (request_id, challenger, answered, part) | None\n\n"
     "fastpath.walk_shadow's result (NotImplemented for data that is not bytes)."},
    {"build_bodies", (PyCFunction)(void (*)(void))build_bodies, METH_FASTCALL,
     "build_bodies(request_id, primary, feedback, shadows, joined_at, prefix, names)\n"
     "    -> list[bytes] | NotImplemented\n\n"
     "parts.build_bodies' bodies (names: FeatureLayouts._names, or None for no layouts);\n"
     "NotImplemented for anything it leaves to Python (unknown layout, unusual part)."},
    {"pack_merge", (PyCFunction)(void (*)(void))pack_merge, METH_FASTCALL,
     "pack_merge(head, state_prefix, tomb_prefix, middle, parts) -> bytes | NotImplemented\n\n"
     "hiredis.pack_command((*head, *keys, *middle, *args)) for the merge script call:\n"
     "keys are state_prefix + id, tomb_prefix + id per part; args kind, challenger, blob,\n"
     "msg_id, rank per part. NotImplemented for arguments of other types."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpath",
    "Compiled shadowpipe.processors.join.fastpath walkers.", -1, methods,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "FORMAT", FORMAT) < 0
        || PyModule_AddIntConstant(m, "MIN_INTERNED", MIN_INTERNED) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
