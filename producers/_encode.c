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
#include "_wire.h" /* schemas/_wire.h: the Avro primitives shared with the joiner's C */
#include <math.h>
#include <stddef.h>
#include <time.h>

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

/* One block (count, entries, 0) whose entries were written to `entries`. */
static int put_block(WireBuf *b, Py_ssize_t count, WireBuf *entries) {
    if (count && (wire_long(b, count) < 0 || wire_bytes(b, entries->data, entries->len) < 0))
        return FAILED;
    return wire_byte(b, 0) < 0 ? FAILED : OK;
}

/* num_features, cat_features, null_features: three blocks, entries in dict order, written
 * in one walk over the dict (the walk is what costs when the caches are cold). */
static int put_features(WireBuf *b, PyObject *features) {
    if (features == Py_None) return wire_bytes(b, "\0\0\0", 3);
    if (!PyDict_CheckExact(features)) return FALLBACK;
    WireBuf block[KINDS];
    Py_ssize_t count[KINDS] = {0, 0, 0}, pos = 0;
    PyObject *name, *value;
    int r = OK;
    for (int kind = NUM; kind < KINDS; kind++) wire_buf_init(&block[kind]);
    while (r == OK && PyDict_Next(features, &pos, &name, &value)) {
        int kind = feature_kind(value);
        double x;
        if (kind < 0 || !PyUnicode_CheckExact(name)) r = FALLBACK;
        else if (kind == NUM && finite_number(value, &x) != OK) r = FALLBACK; /* NaN: missing */
        else r = wire_str(&block[kind], name);
        if (r == OK && kind == NUM) r = wire_double(&block[NUM], x) < 0 ? FAILED : OK;
        if (r == OK && kind == CAT) r = wire_str(&block[CAT], value);
        if (r == OK) count[kind]++;
    }
    for (int kind = NUM; r == OK && kind < KINDS; kind++) r = put_block(b, count[kind], &block[kind]);
    for (int kind = NUM; kind < KINDS; kind++) wire_buf_free(&block[kind]);
    return r;
}

/* map<double> (str -> finite number: the probabilities) or map<string> (str -> str: the
 * context); an empty or absent map is one 0 byte. Context keys must be exact str, as in
 * events.py; probability keys may be str subclasses there too. */
static int put_map(WireBuf *b, PyObject *map, int doubles) {
    if (map == NULL || map == Py_None) return wire_byte(b, 0);
    if (!PyDict_CheckExact(map)) return FALLBACK;
    Py_ssize_t n = PyDict_GET_SIZE(map), pos = 0;
    if (n == 0) return wire_byte(b, 0);
    if (wire_long(b, n) < 0) return FAILED;
    PyObject *key, *value;
    while (PyDict_Next(map, &pos, &key, &value)) {
        double x = 0.0;
        int valid = doubles ? PyUnicode_Check(key) && finite_number(value, &x) == OK
                            : PyUnicode_CheckExact(key) && PyUnicode_Check(value);
        if (!valid) return FALLBACK;
        int r = wire_str(b, key);
        if (r == OK) r = doubles ? (wire_double(b, x) < 0 ? FAILED : OK) : wire_str(b, value);
        if (r != OK) return r;
    }
    return wire_byte(b, 0);
}

/* ["null", "string"] union of None or a str (not a subclass, as in events.py). */
static int put_optional_str(WireBuf *b, PyObject *s) {
    if (s == NULL || s == Py_None) return wire_byte(b, 0);
    if (!PyUnicode_CheckExact(s)) return FALLBACK;
    if (wire_byte(b, 2) < 0) return FAILED;
    return wire_str(b, s);
}

/* ["null", "double"] union of None or a finite float. */
static int put_optional_double(WireBuf *b, PyObject *v) {
    if (v == NULL || v == Py_None) return wire_byte(b, 0);
    double x;
    if (!PyFloat_Check(v) || finite_number(v, &x) != OK) return FALLBACK;
    if (wire_byte(b, 2) < 0) return FAILED;
    return wire_double(b, x);
}

/* The Output record: a str label, a float value, or a dict of label/probabilities/value. */
static int put_output(WireBuf *b, PyObject *output) {
    if (PyUnicode_CheckExact(output)) {
        int r = put_optional_str(b, output);
        return r != OK ? r : wire_bytes(b, "\0\0", 2); /* no probabilities, null value */
    }
    if (PyFloat_CheckExact(output)) {
        if (wire_bytes(b, "\0\0", 2) < 0) return FAILED;
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

/* The event's bytes, None when an input is not the plain case, NULL on an error. */
static PyObject *write_event(PyObject *header, const char *key, Py_ssize_t key_len,
                             long long ms, PyObject *features, PyObject *output,
                             PyObject *model_version, double latency_ms, PyObject *context,
                             double inclusion_prob, PyObject *trace_id) {
    WireBuf b;
    wire_buf_init(&b);
    int r = wire_bytes(&b, PyBytes_AS_STRING(header), PyBytes_GET_SIZE(header));
    if (r == OK) r = wire_long(&b, key_len);
    if (r == OK) r = wire_bytes(&b, key, key_len);
    if (r == OK) r = wire_long(&b, ms);
    if (r == OK) r = wire_bytes(&b, PyBytes_AS_STRING(model_version),
                               PyBytes_GET_SIZE(model_version));
    if (r == OK) r = put_features(&b, features);
    if (r == OK) r = put_output(&b, output);
    if (r == OK) r = wire_double(&b, latency_ms);
    if (r == OK) r = put_map(&b, context, 0);
    if (r == OK) r = wire_double(&b, inclusion_prob);
    if (r == OK) r = put_optional_str(&b, trace_id);
    PyObject *result = NULL;
    if (r == OK) {
        result = PyBytes_FromStringAndSize(b.data, b.len);
    } else if (r == FALLBACK) {
        result = Py_NewRef(Py_None);
    }
    wire_buf_free(&b);
    return result;
}

static PyObject *encode_inference(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "encode_inference takes 10 arguments");
        return NULL;
    }
    PyObject *header = args[0], *request_id = args[1], *model_version = args[4],
             *event_time = args[7], *inclusion_prob = args[8];
    if (!PyBytes_CheckExact(header) || !PyBytes_CheckExact(request_id)
        || !PyBytes_CheckExact(model_version) || !PyLong_CheckExact(event_time)
        || !PyFloat_CheckExact(inclusion_prob)) {
        Py_RETURN_NONE;
    }
    int overflow;
    long long ms = PyLong_AsLongLongAndOverflow(event_time, &overflow);
    double latency_ms;
    if (overflow || (ms == -1 && PyErr_Occurred()) || finite_number(args[5], &latency_ms) != OK) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return write_event(header, PyBytes_AS_STRING(request_id), PyBytes_GET_SIZE(request_id), ms,
                       args[2], args[3], model_version, latency_ms, args[6],
                       PyFloat_AS_DOUBLE(inclusion_prob), args[9]);
}

/* ---- The whole plain emit in one call, and the stage -----------------------------------
 *
 * FastEmit is what Emitter.emit_inference is bound to when the compiled encoder is used:
 * for the common call (request id a non-blank str, no ts, a memoised model that is not
 * sampled, room in librdkafka's queue, plain inputs) it encodes, stages and counts in C;
 * every other call, and any failure on the way, is handed unchanged to the Python method
 * (`slow`), which validates, counts, never raises, and stages through add().
 *
 * The stage is the compiled twin of producers/staging.py's Stage: it holds encoded events
 * and hands them to produce() when the trigger set by the Python BurstPolicy is met (at
 * least `burst` staged and a call no slower than `carry_ms`, `cap` staged, or the oldest
 * `max_wait_ms` old); after each hand-over it gives the policy the events' latencies and
 * serves librdkafka's reports when the policy says so. No decision is taken here. */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *slow;      /* the Python emit_inference, bound: the reference behaviour */
    PyObject *models;    /* dict (model, version) -> (rate, threshold|None, model_version) */
    PyObject *header;    /* bytes: framing of every InferenceEvent */
    PyObject *topic;     /* str */
    PyObject *producer;  /* confluent_kafka.Producer: len() is its queue length */
    PyObject *produce;   /* its bound produce */
    PyObject *serve;     /* bound method serving delivery reports, never raises */
    PyObject *refused;   /* refused(value, key, exception): a staged event produce() refused */
    PyObject *handed_over; /* the policy's handed_over(latencies, carried) */
    int drop_when_full;  /* a plain call with no room is dropped here (else: to `slow`) */
    long long full_drops; /* plain calls dropped for room */
    PyObject *last_model, *last_version, *last_memo; /* the previous call's memo entry */
    PyObject *sent;      /* itertools.count shared with the Python path */
    PyObject **staged;   /* cap (value bytes, key) pairs */
    double *latencies;   /* latency_ms of each staged event */
    int staged_n, cap, burst;
    long long staged_at_ms;  /* event time of the oldest staged event */
    long long max_wait_ms;
    double carry_ms;     /* the policy's bound on the latency of a call carrying a burst */
    Py_ssize_t room;     /* events that fit in librdkafka's queue at the last look, less
                          * those staged since: len() is only asked when it runs out */
    Py_ssize_t max_messages, max_queue_bytes; /* librdkafka's two bounds */
    Py_ssize_t biggest;  /* the largest event staged: the size assumed of every queued one */
    Py_ssize_t max_bytes; /* of one event */
    int closed;
} FastEmit;

enum { KW_MODEL, KW_VERSION, KW_LATENCY, KW_CONTEXT, KW_TS, KW_TRACE, KW_COUNT };
static const char *kw_names[KW_COUNT] = {"model", "version", "latency_ms", "context", "ts",
                                         "trace_id"};
static PyObject *kw_strings[KW_COUNT];

/* Keyword values by name; 0 when every keyword is known, 1 otherwise. */
static int read_keywords(PyObject *const *values, PyObject *kwnames, PyObject **out) {
    Py_ssize_t n = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        int k = 0;
        while (k < KW_COUNT && name != kw_strings[k]
               && PyUnicode_Compare(name, kw_strings[k]) != 0) k++;
        if (k == KW_COUNT || out[k] != NULL) return 1;
        out[k] = values[i];
    }
    return 0;
}

/* A str that is neither empty nor only whitespace (as `s and not s.isspace()`). */
static int usable_id(PyObject *s) {
    if (!PyUnicode_CheckExact(s)) return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, i))) return 1;
    }
    return 0;
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The memo entry of (model, version), a new reference, or NULL. A service passes the same
 * two objects on every call: the entry of the previous call is kept with them (entries
 * never change; the dict may be cleared by the Python side, which only costs a lookup). */
static PyObject *remembered_memo(FastEmit *self, PyObject *model, PyObject *version) {
    if (model == self->last_model && version == self->last_version)
        return Py_NewRef(self->last_memo);
    PyObject *memo_key = PyTuple_Pack(2, model, version);
    if (memo_key == NULL) return NULL;
    PyObject *memo = Py_XNewRef(PyDict_GetItemWithError(self->models, memo_key));
    Py_DECREF(memo_key);
    if (memo != NULL) {
        Py_XSETREF(self->last_model, Py_NewRef(model));
        Py_XSETREF(self->last_version, Py_NewRef(version));
        Py_XSETREF(self->last_memo, Py_NewRef(memo));
    }
    return memo;
}

/* How many more events fit in librdkafka's queue after the staged ones, by its message
 * bound and by its byte bound with every event taken as large as the largest staged. */
static void look_at_queue(FastEmit *self) {
    Py_ssize_t queued = PyObject_Length(self->producer);
    if (queued < 0) { PyErr_Clear(); self->room = 0; return; }
    Py_ssize_t waiting = queued + self->staged_n, size = self->biggest > 0 ? self->biggest : 1;
    Py_ssize_t by_count = self->max_messages - waiting;
    Py_ssize_t by_bytes = self->max_queue_bytes / size - waiting;
    self->room = by_count < by_bytes ? by_count : by_bytes;
}

/* 1 when one more event of `size` bytes (0: not known yet) fits, counting the staged. */
static int has_room(FastEmit *self, Py_ssize_t size) {
    if (size > self->biggest) {
        self->biggest = size;
        self->room = 0;
    }
    if (self->room <= 0) look_at_queue(self);
    return self->room > 0;
}

/* write_event for this call with the memoised model fields; NULL when not plain, too
 * large, or larger than any staged before and the byte bound has no room for it. */
static PyObject *encode_plain(FastEmit *self, PyObject *const *args, PyObject **kw,
                              PyObject *memo, long long now, double latency_ms) {
    Py_ssize_t key_len;
    const char *key = PyUnicode_AsUTF8AndSize(args[0], &key_len); /* cached by the str */
    PyObject *model_version = PyTuple_GET_ITEM(memo, 2), *rate = PyTuple_GET_ITEM(memo, 0);
    if (key == NULL || !PyBytes_CheckExact(model_version) || !PyFloat_CheckExact(rate)) {
        return NULL;
    }
    PyObject *data = write_event(self->header, key, key_len, now, args[1], args[2],
                                 model_version, latency_ms,
                                 kw[KW_CONTEXT] ? kw[KW_CONTEXT] : Py_None,
                                 PyFloat_AS_DOUBLE(rate), kw[KW_TRACE] ? kw[KW_TRACE] : Py_None);
    if (data == Py_None) {
        Py_CLEAR(data);
    } else if (data != NULL) {
        Py_ssize_t size = PyBytes_GET_SIZE(data);
        if (size > self->max_bytes || !has_room(self, size + key_len)) Py_CLEAR(data);
    }
    return data;
}

/* The encoded event, or NULL (no exception set) when the call is not the plain case. */
static PyObject *plain_event(FastEmit *self, PyObject *const *args, PyObject **kw,
                             long long now, double *latency_ms, int *no_room) {
    PyObject *request_id = args[0];
    if (kw[KW_MODEL] == NULL || kw[KW_VERSION] == NULL || kw[KW_LATENCY] == NULL
        || (kw[KW_TS] != NULL && kw[KW_TS] != Py_None) || !usable_id(request_id)
        || finite_number(kw[KW_LATENCY], latency_ms) != OK) return NULL;
    PyObject *memo = remembered_memo(self, kw[KW_MODEL], kw[KW_VERSION]);
    if (memo == NULL) return NULL;
    PyObject *data = NULL;
    int plain = PyTuple_CheckExact(memo) && PyTuple_GET_SIZE(memo) == 3
        && PyTuple_GET_ITEM(memo, 1) == Py_None;
    *no_room = plain && !has_room(self, 0);
    if (plain && !*no_room) {
        data = encode_plain(self, args, kw, memo, now, *latency_ms);
    }
    Py_DECREF(memo);
    return data;
}

/* The exception being raised, normalised and cleared (a new reference). */
static PyObject *take_exception(void) {
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return value;
#endif
}

/* Asks the policy about a hand-over of these latencies: 1 serve reports, 0 not. Errors
 * (none expected) are cleared: the events are in librdkafka's hands already. */
static int ask_policy(FastEmit *self, const double *latencies, int n, int carried) {
    PyObject *list = PyList_New(n), *answer = NULL;
    int serve = 1;
    for (int i = 0; list != NULL && i < n; i++) {
        PyObject *x = PyFloat_FromDouble(latencies[i]);
        if (x == NULL) Py_CLEAR(list);
        else PyList_SET_ITEM(list, i, x);
    }
    if (list != NULL) {
        answer = PyObject_CallFunctionObjArgs(self->handed_over, list,
                                              carried ? Py_True : Py_False, NULL);
    }
    if (answer != NULL && PyTuple_Check(answer) && PyTuple_GET_SIZE(answer) == 2) {
        serve = PyObject_IsTrue(PyTuple_GET_ITEM(answer, 0));
        double carry = PyFloat_AsDouble(PyTuple_GET_ITEM(answer, 1));
        if (!(carry == -1.0 && PyErr_Occurred())) self->carry_ms = carry;
    }
    Py_XDECREF(list);
    Py_XDECREF(answer);
    PyErr_Clear();
    return serve != 0;
}

/* Produces every staged event, tells the policy and serves reports if it says so; returns
 * how many were handed over. The stage is emptied first: `refused` and the policy run
 * Python code, during which another thread may stage and hand over its own events. */
static int hand_over(FastEmit *self, int carried) {
    int n = self->staged_n;
    if (n == 0) return 0;
    PyObject **batch = PyMem_Malloc(2 * (size_t)n * sizeof(PyObject *));
    double *latencies = PyMem_Malloc((size_t)n * sizeof(double));
    if (batch == NULL || latencies == NULL) { /* keep them staged: a later call retries */
        PyMem_Free(batch);
        PyMem_Free(latencies);
        return 0;
    }
    memcpy(batch, self->staged, 2 * (size_t)n * sizeof(PyObject *));
    memcpy(latencies, self->latencies, (size_t)n * sizeof(double));
    self->staged_n = 0;
    for (int i = 0; i < n; i++) {
        PyObject *value = batch[2 * i], *key = batch[2 * i + 1];
        PyObject *produce_args[3] = {self->topic, value, key};
        PyObject *r = PyObject_Vectorcall(self->produce, produce_args, 3, NULL);
        if (r == NULL) {
            PyObject *exc = take_exception();
            r = PyObject_CallFunctionObjArgs(self->refused, value, key,
                                             exc ? exc : Py_None, NULL);
            Py_XDECREF(exc);
        }
        Py_XDECREF(r);
        PyErr_Clear(); /* refused never raises; nothing may reach the caller */
        Py_DECREF(value);
        Py_DECREF(key);
    }
    PyMem_Free(batch);
    look_at_queue(self);
    if (ask_policy(self, latencies, n, carried)) {
        Py_XDECREF(PyObject_CallNoArgs(self->serve));
        PyErr_Clear();
    }
    PyMem_Free(latencies);
    return n;
}

/* Stages an encoded event (steals `data`, counts it as sent) and hands the stage over when
 * the policy's trigger is met. */
static void stage(FastEmit *self, PyObject *data, PyObject *key, long long now,
                  double latency_ms) {
    if (self->staged_n >= self->cap) hand_over(self, 0); /* only after a racing thread */
    if (self->staged_n == 0) self->staged_at_ms = now;
    self->staged[2 * self->staged_n] = data;
    self->staged[2 * self->staged_n + 1] = Py_NewRef(key);
    self->latencies[self->staged_n] = latency_ms;
    self->staged_n++;
    self->room--;
    Py_XDECREF(PyIter_Next(self->sent));
    PyErr_Clear(); /* counting may not fail the (staged) event */
    if (self->staged_n >= self->cap || now - self->staged_at_ms >= self->max_wait_ms
        || (self->staged_n >= self->burst && latency_ms <= self->carry_ms))
        hand_over(self, 1);
}

static PyObject *fast_emit_call(PyObject *callable, PyObject *const *args, size_t nargsf,
                                PyObject *kwnames) {
    FastEmit *self = (FastEmit *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *kw[KW_COUNT] = {NULL};
    if (!self->closed && nargs == 3 && read_keywords(args + nargs, kwnames, kw) == 0) {
        long long now = now_ms();
        double latency_ms = 0.0;
        int no_room = 0;
        PyObject *data = plain_event(self, args, kw, now, &latency_ms, &no_room);
        if (data != NULL) {
            stage(self, data, args[0], now, latency_ms);
            Py_RETURN_TRUE;
        }
        if (no_room && self->drop_when_full) {
            PyErr_Clear();
            self->full_drops++; /* the emitter's thread logs them */
            Py_RETURN_FALSE;
        }
    }
    /* Not the plain case (or no room): the Python method decides and counts. */
    PyErr_Clear();
    return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
}

/* add(data, key, latency_ms) -> bool: the Python method's staging (Stage.add). */
static PyObject *fast_emit_add(FastEmit *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyBytes_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "add(data: bytes, key, latency_ms: float)");
        return NULL;
    }
    Py_ssize_t key_len = PyObject_Length(args[1]);
    double latency_ms = PyFloat_AsDouble(args[2]);
    if (key_len < 0 || (latency_ms == -1.0 && PyErr_Occurred())) return NULL;
    if (!has_room(self, PyBytes_GET_SIZE(args[0]) + key_len)) Py_RETURN_FALSE;
    stage(self, Py_NewRef(args[0]), args[1], now_ms(), latency_ms);
    Py_RETURN_TRUE;
}

static int fast_emit_traverse(FastEmit *self, visitproc visit, void *arg) {
    Py_VISIT(self->slow); Py_VISIT(self->models); Py_VISIT(self->header);
    Py_VISIT(self->topic); Py_VISIT(self->producer); Py_VISIT(self->produce);
    Py_VISIT(self->serve); Py_VISIT(self->refused); Py_VISIT(self->handed_over);
    Py_VISIT(self->sent);
    Py_VISIT(self->last_model); Py_VISIT(self->last_version); Py_VISIT(self->last_memo);
    for (int i = 0; i < 2 * self->staged_n; i++) Py_VISIT(self->staged[i]);
    return 0;
}

static int fast_emit_clear(FastEmit *self) {
    Py_CLEAR(self->slow); Py_CLEAR(self->models); Py_CLEAR(self->header);
    Py_CLEAR(self->topic); Py_CLEAR(self->producer); Py_CLEAR(self->produce);
    Py_CLEAR(self->serve); Py_CLEAR(self->refused); Py_CLEAR(self->handed_over);
    Py_CLEAR(self->sent);
    Py_CLEAR(self->last_model); Py_CLEAR(self->last_version); Py_CLEAR(self->last_memo);
    int n = self->staged_n;
    self->staged_n = 0;
    for (int i = 0; i < 2 * n; i++) Py_CLEAR(self->staged[i]);
    return 0;
}

static void fast_emit_dealloc(FastEmit *self) {
    PyObject_GC_UnTrack(self);
    fast_emit_clear(self);
    PyMem_Free(self->staged);
    PyMem_Free(self->latencies);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *fast_emit_hand_over(FastEmit *self, PyObject *unused) {
    return PyLong_FromLong(hand_over(self, 0));
}

static PyObject *fast_emit_staged(FastEmit *self, void *unused) {
    return PyLong_FromLong(self->staged_n);
}

static PyObject *fast_emit_full_drops(FastEmit *self, void *unused) {
    return PyLong_FromLongLong(self->full_drops);
}

static PyObject *fast_emit_close(FastEmit *self, PyObject *unused) {
    self->closed = 1;
    return PyLong_FromLong(hand_over(self, 0));
}

static PyMethodDef fast_emit_methods[] = {
    {"add", (PyCFunction)(void (*)(void))fast_emit_add, METH_FASTCALL,
     "add(data, key, latency_ms) -> bool\n\nStage an encoded event (counted as sent); False "
     "when librdkafka's queue has no room for it."},
    {"hand_over", (PyCFunction)fast_emit_hand_over, METH_NOARGS,
     "Produce the staged events now; returns how many."},
    {"close", (PyCFunction)fast_emit_close, METH_NOARGS,
     "Hand the stage over and send every later call to the Python method."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef fast_emit_getset[] = {
    {"staged", (getter)fast_emit_staged, NULL, "events waiting to be handed to produce()",
     NULL},
    {"full_drops", (getter)fast_emit_full_drops, NULL,
     "plain calls dropped here for lack of room (queue_full)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FastEmitType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shadowpipe.producers._encode.FastEmit",
    .tp_doc = "emit_inference's plain case in C, and the stage of every inference event.",
    .tp_basicsize = sizeof(FastEmit),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(FastEmit, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_traverse = (traverseproc)fast_emit_traverse,
    .tp_clear = (inquiry)fast_emit_clear,
    .tp_dealloc = (destructor)fast_emit_dealloc,
    .tp_methods = fast_emit_methods,
    .tp_getset = fast_emit_getset,
};

/* An int attribute of the policy; -1 with an error set. */
static long long policy_int(PyObject *policy, const char *name) {
    PyObject *v = PyObject_GetAttrString(policy, name);
    if (v == NULL) return -1;
    long long x = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return x;
}

static PyObject *fast_emitter(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "fast_emitter takes 13 arguments");
        return NULL;
    }
    if (!PyDict_Check(args[1]) || !PyBytes_CheckExact(args[2]) || !PyUnicode_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError, "fast_emitter: models dict, header bytes, topic str");
        return NULL;
    }
    PyObject *policy = args[4];
    long long cap = policy_int(policy, "cap"), burst = policy_int(policy, "burst");
    long long max_wait_ms = policy_int(policy, "max_wait_ms");
    Py_ssize_t max_bytes = PyLong_AsSsize_t(args[3]);
    Py_ssize_t max_messages = PyLong_AsSsize_t(args[11]);
    Py_ssize_t max_queue_bytes = PyLong_AsSsize_t(args[12]);
    if (PyErr_Occurred()) return NULL;
    if (cap < 1 || cap > 1 << 16 || burst < 1) {
        PyErr_SetString(PyExc_ValueError, "fast_emitter: policy cap in 1..65536, burst >= 1");
        return NULL;
    }
    PyObject *produce = PyObject_GetAttrString(args[6], "produce");
    PyObject *handed_over = PyObject_GetAttrString(policy, "handed_over");
    FastEmit *self = produce && handed_over ? PyObject_GC_New(FastEmit, &FastEmitType) : NULL;
    if (self == NULL) {
        Py_XDECREF(produce);
        Py_XDECREF(handed_over);
        return NULL;
    }
    self->staged = PyMem_Malloc(2 * (size_t)cap * sizeof(PyObject *));
    self->latencies = PyMem_Malloc((size_t)cap * sizeof(double));
    self->vectorcall = fast_emit_call;
    self->slow = Py_NewRef(args[0]);
    self->models = Py_NewRef(args[1]);
    self->header = Py_NewRef(args[2]);
    self->max_bytes = max_bytes;
    self->handed_over = handed_over;
    self->topic = Py_NewRef(args[5]);
    self->producer = Py_NewRef(args[6]);
    self->produce = produce;
    self->serve = Py_NewRef(args[7]);
    self->refused = Py_NewRef(args[8]);
    self->drop_when_full = PyObject_IsTrue(args[9]) > 0;
    self->sent = Py_NewRef(args[10]);
    self->max_messages = max_messages;
    self->max_queue_bytes = max_queue_bytes;
    self->cap = (int)cap;
    self->burst = (int)burst;
    self->max_wait_ms = max_wait_ms;
    self->carry_ms = Py_HUGE_VAL;
    self->full_drops = 0;
    self->biggest = 0;
    self->room = 0;
    self->staged_n = 0;
    self->staged_at_ms = 0;
    self->last_model = self->last_version = self->last_memo = NULL;
    self->closed = 0;
    PyObject_GC_Track(self);
    if (self->staged == NULL || self->latencies == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static PyMethodDef methods[] = {
    {"encode_inference", (PyCFunction)(void (*)(void))encode_inference, METH_FASTCALL,
     "encode_inference(header, request_id, features, output, model_version, latency_ms,\n"
     "                 context, event_time, inclusion_prob, trace_id) -> bytes | None\n\n"
     "The InferenceEvent bytes for plain inputs, None for the Python encoder to handle."},
    {"fast_emitter", (PyCFunction)(void (*)(void))fast_emitter, METH_FASTCALL,
     "fast_emitter(slow, models, header, max_bytes, policy, topic, producer, serve, refused,\n"
     "             drop_when_full, sent, max_messages, max_queue_bytes) -> FastEmit\n\n"
     "A callable with emit_inference's signature (the plain case in C, the rest to slow)\n"
     "that is also the stage of producers/staging.py (add, hand_over, close, staged)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_encode",
    "Compiled common case of shadowpipe.producers.events.EventEncoder.inference.", -1, methods,
};

PyMODINIT_FUNC PyInit__encode(void) {
    for (int k = 0; k < KW_COUNT; k++) {
        if ((kw_strings[k] = PyUnicode_InternFromString(kw_names[k])) == NULL) return NULL;
    }
    if (PyType_Ready(&FastEmitType) < 0) return NULL;
    return PyModule_Create(&module);
}
