/* Avro's binary primitives for the compiled fast paths: the C side of schemas/wire.py.
 *
 * Included by producers/_encode.c (the InferenceEvent writer) and processors/join/_fastpath.c
 * (the joiner's readers and layouts); pyproject.toml puts schemas/ on their include path.
 * Everything here is `static inline`: each extension gets its own copy, and an extension
 * that uses only the writers pays nothing for the readers.
 *
 * Writers append to a WireBuf (2 KiB on the stack, then the heap) or to a caller's array;
 * readers take (data, size, position) and return the position after what they read, or
 * WIRE_FAIL when the bytes are not in that form (truncated, out of range, invalid UTF-8).
 */
#ifndef SHADOWPIPE_WIRE_H
#define SHADOWPIPE_WIRE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef const unsigned char *WireData;

#define WIRE_FAIL ((Py_ssize_t)-1)
#define WIRE_LONG_MAX 10 /* bytes of the longest canonical Avro long */

/* ---- writing ---------------------------------------------------------------------------- */

/* Avro long (zig-zag, then base-128 varint) into out; returns the bytes written. */
static inline int wire_put_long(unsigned char *out, int64_t v) {
    uint64_t z = ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
    int k = 0;
    while (z > 0x7F) {
        out[k++] = (unsigned char)((z & 0x7F) | 0x80);
        z >>= 7;
    }
    out[k++] = (unsigned char)z;
    return k;
}

/* Avro double: little-endian IEEE 754. */
static inline void wire_put_double(unsigned char *out, double x) {
#if PY_LITTLE_ENDIAN
    memcpy(out, &x, 8);
#else
    PyFloat_Pack8(x, (char *)out, 1);
#endif
}

typedef struct {
    char *data;
    Py_ssize_t len, cap;
    char local[2048];
} WireBuf;

static inline void wire_buf_init(WireBuf *b) {
    b->data = b->local;
    b->len = 0;
    b->cap = sizeof b->local;
}

static inline void wire_buf_free(WireBuf *b) {
    if (b->data != b->local) PyMem_Free(b->data);
}

/* Room for `extra` more bytes; -1 with MemoryError set. */
static inline int wire_reserve(WireBuf *b, Py_ssize_t extra) {
    if (b->len + extra <= b->cap) return 0;
    Py_ssize_t cap = b->cap * 2;
    while (cap < b->len + extra) cap *= 2;
    char *data = PyMem_Malloc(cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(data, b->data, b->len);
    wire_buf_free(b);
    b->data = data;
    b->cap = cap;
    return 0;
}

static inline int wire_bytes(WireBuf *b, const void *src, Py_ssize_t n) {
    if (wire_reserve(b, n) < 0) return -1;
    memcpy(b->data + b->len, src, n);
    b->len += n;
    return 0;
}

static inline int wire_byte(WireBuf *b, unsigned char c) { return wire_bytes(b, &c, 1); }

static inline int wire_long(WireBuf *b, int64_t v) {
    if (wire_reserve(b, WIRE_LONG_MAX) < 0) return -1;
    b->len += wire_put_long((unsigned char *)b->data + b->len, v);
    return 0;
}

static inline int wire_double(WireBuf *b, double x) {
    if (wire_reserve(b, 8) < 0) return -1;
    wire_put_double((unsigned char *)b->data + b->len, x);
    b->len += 8;
    return 0;
}

/* Avro string (size, UTF-8 bytes) of a str: 0 written, 1 it has no UTF-8 form (a lone
 * surrogate; nothing written, no error set), -1 error. */
static inline int wire_str(WireBuf *b, PyObject *s) {
    Py_ssize_t n;
    const char *utf8;
    if (PyUnicode_IS_COMPACT_ASCII(s)) { /* the usual name or label: its bytes are UTF-8 */
        n = PyUnicode_GET_LENGTH(s);
        utf8 = (const char *)PyUnicode_DATA(s);
    } else if ((utf8 = PyUnicode_AsUTF8AndSize(s, &n)) == NULL) {
        PyErr_Clear();
        return 1;
    }
    return wire_long(b, n) < 0 || wire_bytes(b, utf8, n) < 0 ? -1 : 0;
}

/* ---- reading ---------------------------------------------------------------------------- */

/* Avro long, read as schemas/wire.py's read_long reads it: at most WIRE_LONG_MAX bytes and
 * a zig-zag value within 64 bits, else WIRE_FAIL (as for running out of data). */
static inline Py_ssize_t wire_read_long(WireData d, Py_ssize_t n, Py_ssize_t pos, int64_t *out) {
    uint64_t r = 0;
    for (int shift = 0; shift < 7 * WIRE_LONG_MAX; shift += 7) {
        if (pos >= n) return WIRE_FAIL;
        unsigned char byte = d[pos++];
        uint64_t bits = byte & 0x7F;
        if (shift == 63 && bits > 1) return WIRE_FAIL; /* beyond 64 bits */
        r |= bits << shift;
        if (byte < 0x80) {
            *out = (int64_t)(r >> 1) ^ -(int64_t)(r & 1);
            return pos;
        }
    }
    return WIRE_FAIL; /* an 11th byte */
}

/* Past a long whose value is not needed: at most WIRE_LONG_MAX bytes. */
static inline Py_ssize_t wire_skip_long(WireData d, Py_ssize_t n, Py_ssize_t pos) {
    for (int k = 0; k < WIRE_LONG_MAX && pos < n; k++) {
        if (d[pos++] < 0x80) return pos;
    }
    return WIRE_FAIL;
}

static inline double wire_get_double(WireData p) {
    return PyFloat_Unpack8((const char *)p, 1);
}

/* The little-endian double at p is NaN or infinite (all exponent bits set). */
static inline int wire_non_finite(WireData p) {
    return (p[7] & 0x7F) == 0x7F && (p[6] & 0xF0) == 0xF0;
}

/* A double's end, if it fits. */
static inline Py_ssize_t wire_skip_double(Py_ssize_t n, Py_ssize_t pos) {
    return pos == WIRE_FAIL || pos > n - 8 ? WIRE_FAIL : pos + 8;
}

/* Python's strict UTF-8: no overlongs, no surrogates, nothing above U+10FFFF. */
static inline int wire_utf8_ok(WireData s, Py_ssize_t n) {
    Py_ssize_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c < 0xC2) return 0;
        if (c < 0xE0) {
            if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80) return 0;
            i += 2;
            continue;
        }
        if (c < 0xF0) {
            if (i + 2 >= n) return 0;
            unsigned char c1 = s[i + 1];
            if ((c1 & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80) return 0;
            if ((c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 >= 0xA0)) return 0;
            i += 3;
            continue;
        }
        if (c < 0xF5) {
            if (i + 3 >= n) return 0;
            unsigned char c1 = s[i + 1];
            if ((c1 & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80 || (s[i + 3] & 0xC0) != 0x80)
                return 0;
            if ((c == 0xF0 && c1 < 0x90) || (c == 0xF4 && c1 >= 0x90)) return 0;
            i += 4;
            continue;
        }
        return 0;
    }
    return 1;
}

/* A bytes/string value: its start in *at, its size in *size; returns its end. */
static inline Py_ssize_t wire_text(WireData d, Py_ssize_t n, Py_ssize_t pos, Py_ssize_t *at,
                                   Py_ssize_t *size) {
    int64_t len;
    pos = wire_read_long(d, n, pos, &len);
    if (pos == WIRE_FAIL || len < 0 || len > n - pos) return WIRE_FAIL;
    *at = pos;
    *size = (Py_ssize_t)len;
    return pos + (Py_ssize_t)len;
}

/* Past a string, checking its UTF-8. */
static inline Py_ssize_t wire_skip_string(WireData d, Py_ssize_t n, Py_ssize_t pos) {
    Py_ssize_t at, size;
    if (pos == WIRE_FAIL) return WIRE_FAIL;
    pos = wire_text(d, n, pos, &at, &size);
    return pos == WIRE_FAIL || !wire_utf8_ok(d + at, size) ? WIRE_FAIL : pos;
}

/* Union ["null", T] at pos: 0 for null, 1 for T (which starts at pos + 1), WIRE_FAIL else. */
static inline int wire_branch(WireData d, Py_ssize_t n, Py_ssize_t pos) {
    if (pos == WIRE_FAIL || pos >= n) return WIRE_FAIL;
    return d[pos] == 0 ? 0 : d[pos] == 2 ? 1 : WIRE_FAIL;
}

static inline Py_ssize_t wire_skip_opt_string(WireData d, Py_ssize_t n, Py_ssize_t pos) {
    int b = wire_branch(d, n, pos);
    return b == WIRE_FAIL ? WIRE_FAIL : b ? wire_skip_string(d, n, pos + 1) : pos + 1;
}

static inline Py_ssize_t wire_skip_opt_double(WireData d, Py_ssize_t n, Py_ssize_t pos) {
    int b = wire_branch(d, n, pos);
    return b == WIRE_FAIL ? WIRE_FAIL : b ? wire_skip_double(n, pos + 1) : pos + 1;
}

/* A map's or array's single block count (a negative count, i.e. a block with a byte size,
 * fails); every item takes at least one byte, so a larger count can only run out of data. */
static inline Py_ssize_t wire_block(WireData d, Py_ssize_t n, Py_ssize_t pos, int64_t *count) {
    if (pos == WIRE_FAIL) return WIRE_FAIL;
    pos = wire_read_long(d, n, pos, count);
    return pos == WIRE_FAIL || *count < 0 || *count > n - pos ? WIRE_FAIL : pos;
}

/* After the items: the zero that ends a non-empty block (a second block fails). */
static inline Py_ssize_t wire_block_end(WireData d, Py_ssize_t n, Py_ssize_t pos, int64_t count) {
    if (pos == WIRE_FAIL || !count) return pos;
    return pos < n && d[pos] == 0 ? pos + 1 : WIRE_FAIL;
}

#endif /* SHADOWPIPE_WIRE_H */
