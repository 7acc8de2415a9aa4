/* The worker's compiled packet engine: the window of window.py in C, and a socket loop around it.
 *
 * window.py stays the specification. Transfer is its Transfer: a core without I/O that is given
 * datagrams and the time and says what to send (quantization with the agreed block exponents,
 * packets laid out as wire.py lays them out, chunk c in slot c % S, the priming uses, the
 * exponent of chunk c + S riding in chunk c, rounds kept by the caller across calls, RFC 6298's
 * timeout with Karn's rule, the gap rule's fast retransmission, duplicates, STALE and REFUSED).
 * tests/test_window.py runs both through the same seeded lossy network and requires the same
 * datagrams, in the same order, the same sums, statistics, rounds and round-trip state.
 *
 * Driver is the socket loop around a Transfer (the Python engine's is shim.py's _run): it runs a
 * whole transfer on a connected non-blocking UDP socket with the GIL released, reading with
 * recvmmsg and sending with sendmmsg, the datagrams of one flush as UDP GSO messages (one route
 * lookup and buffer per message rather than per datagram). While it runs the socket takes UDP
 * GRO, so the switch's GSO messages arrive as one buffer each, which the loop cuts into their
 * datagrams. Results are written into the output array as they come: no Python object per
 * packet.
 *
 * Arithmetic is worker/quantize.py's bit for bit: float64 products and quotients (built with
 * -ffp-contract=off, so nothing is fused), round half to even (cvtpd2dq under the default
 * rounding mode, as numpy's rint), frexp for the block exponents. It uses SSE2, so x86-64 only.
 *
 * Where the time goes (perf, n = 4, K = 1024, 10 M float32 on loopback, 2 cores): a rank spends
 * about 40% of its CPU on quantizing and dequantizing (the float64 division most) and 60% in
 * the kernel (copying datagrams in and out, the output's fresh pages); with the switch, the
 * call keeps both cores about 80% busy, so less CPU per packet is what would make it faster.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <emmintrin.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

/* wire.py's layout (HEADER_FIELDS), mirrored here; tests/test_window.py compares the packets this
 * file builds with wire.Header.pack byte for byte, and these constants with wire's. */
#define HEADER_BYTES 28
#define ELEMENT_BYTES 4
enum {
    AT_MSG_TYPE = 0,
    AT_RANK = 1,
    AT_JOB_ID = 2,
    AT_VERSION_SLOT = 4, /* version << 15 | slot */
    AT_EXPONENT = 6,
    AT_FORMAT = 7,
    AT_ROUND = 8,
    AT_COUNT = 10,
    AT_CHUNK = 12,
    AT_LENGTH = 16,
    AT_SESSION = 20,
};
enum {
    MSG_DATA = 1, MSG_RESULT = 2, MSG_STALE = 5, MSG_REFUSED = 6, MSG_WAITING = 7, MSG_RELEASE = 8,
    MSG_RESEND = 9
};
#define EXPONENT_BIAS 127
#define EXPONENT_MIN (1 - EXPONENT_BIAS)

#define PRIME (-1) /* window.PRIME: the chunk of a slot's priming use */
#define DONE_SLOT (-2) /* take_result: the slot has nothing more to send in this call */
#define RELEASE_ENTRY 0x80000000u /* a queue entry naming a RELEASE header, not a slot */

/* What a receive or a run ends with; CHECK_IN: Python's turn to run signal handlers. */
enum { GOING, STALE, REFUSED, DONE, STALLED, CHECK_IN, FAILED };

/* The statistics a transfer counts, named as WorkerStats' fields. */
enum {
    RETRANSMISSIONS, TIMEOUTS, FAST_RETRANSMISSIONS, DUPLICATES, WAITS, LATE, PACKETS_SENT,
    PACKETS_RECEIVED, BYTES_SENT, BYTES_RECEIVED, NUM_STATS
};
static const char *const STAT_NAMES[NUM_STATS] = {
    "retransmissions", "timeouts", "fast_retransmissions", "duplicates", "waits", "late",
    "packets_sent", "packets_received", "bytes_sent", "bytes_received",
};

#define RX_BATCH 32            /* messages per recvmmsg */
#define CHECK_IN_S 0.05        /* the socket loop lets Python handle signals this often */
#define RX_ROOM 65536          /* a GRO message is at most one IPv4 datagram's payload */
#define GSO_SEGMENTS 64        /* the kernel's UDP_MAX_SEGMENTS */
#define GSO_BYTES (65535 - 28) /* one IPv4 UDP datagram's payload at most */
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

/* window._SlotUse: the one packet a slot has in flight. */
typedef struct {
    int64_t chunk; /* index into the tensor's chunks, or PRIME */
    uint32_t wire_chunk;
    uint16_t round, count;
    uint32_t retries;
    double sent_at, first_sent_at, deadline;
    int32_t heap_at;          /* where the slot's timer is in the heap; -1: not there */
    int32_t older, newer;     /* neighbours in the order of sending (window.py's _sent_order) */
    uint8_t active;           /* in window.py's _uses (and _sent_order) */
    uint8_t queued;           /* its packet waits in the send queue */
    uint8_t held;             /* timed out, not resent: waits for the probe's answer */
    uint8_t waiting;          /* the switch answered WAITING: it holds this use's contribution */
} use_t;

typedef struct Transfer Transfer;
/* Hands over the queued packets (sends them, or makes them bytes); the queue is then empty. */
typedef void (*drain_t)(Transfer *t, void *context);

struct Transfer {
    PyObject_HEAD
    /* the job */
    uint16_t job_id;
    uint8_t rank, format;
    uint32_t world_size, slot_count, k, datagram;
    uint32_t first_slot; /* Job.first_slot: the switch's slot of window slot 0 */
    uint32_t lane_bits, per_word, chunk_elements; /* Job.lane_bits, 32 / lane_bits, K * that */
    uint64_t session;
    double peak_level; /* quantize.peak_level: m */
    int64_t lane_bias; /* k * m, subtracted from each narrow lane's sum (quantize.from_lanes) */
    uint32_t contributors; /* Job.contributors: the quorum, or the world size */
    int stochastic;     /* Job.noise_key is set: round stochastically (quantize.uniforms) */
    uint64_t noise_key;
    /* the tensor */
    Py_buffer flat, out;
    int scaled; /* float32: quantized per block; int32: sent as is */
    uint32_t length, chunks, slots; /* slots: min(slot_count, chunks), the ones used */
    uint8_t *local_exp, *global_exp;
    uint8_t *late; /* per chunk: its sums came without this rank's (a quorum completed it) */
    /* what the caller keeps across calls, copied in at the start */
    uint16_t *rounds;
    double min_rto, max_rto, srtt, rttvar, min_rtt;
    int has_srtt, has_min_rtt;
    unsigned long long stats[NUM_STATS]; /* since the caller last took them */
    unsigned long long results;
    double progress_at;
    /* the window */
    use_t *uses;
    uint8_t *packets;  /* a slot's packet, kept for resending */
    uint32_t *heap;    /* timers: slots ordered by (deadline, slot), as window.py's heap */
    uint32_t nheap, active;
    int32_t oldest, newest; /* ends of the order of sending; -1: none */
    uint32_t *queue;   /* what is to be sent, in order: a slot's packet, or RELEASE_ENTRY | i */
    uint32_t nqueue;
    uint8_t *releases; /* RELEASE headers to send: entry i of the queue's RELEASE_ENTRY | i */
    uint32_t nreleases;
    Py_buffer early;   /* window.early_results: the caller's, one datagram per slot and version */
    int32_t probe;     /* the slot whose use was resent for the held ones; -1: none */
    uint32_t stalls;   /* probes since the last result: the next one's backoff */
    uint32_t *held;    /* scratch: the held slots, oldest first, when a stall ends */
    drain_t drain;     /* called when the queue is full, or a queued packet is to be rewritten */
    void *drain_context;
    PyObject *taken;   /* the sans-IO methods' answer: the drained packets as bytes */
    int started, running;
    uint8_t refusal[HEADER_BYTES]; /* the REFUSED header */
};

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) << 32 | rd32(p + 4); }
static inline void wr16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}
static inline void wr32(uint8_t *p, uint32_t v) {
    wr16(p, (uint16_t)(v >> 16));
    wr16(p + 2, (uint16_t)v);
}
static inline void wr64(uint8_t *p, uint64_t v) {
    wr32(p, (uint32_t)(v >> 32));
    wr32(p + 4, (uint32_t)v);
}

/* -- quantization (quantize.py) -------------------------------------------------------------- */

/* quantize.block_exponents of one block: e + bias for max|x| < 2**e, or 0 for all zeros. */
static uint8_t block_exponent(const float *x, size_t n) {
    const __m128 magnitude = _mm_castsi128_ps(_mm_set1_epi32(0x7FFFFFFF));
    __m128 peak4 = _mm_setzero_ps();
    size_t i = 0;
    for (; i + 4 <= n; i += 4)
        peak4 = _mm_max_ps(peak4, _mm_and_ps(_mm_loadu_ps(x + i), magnitude));
    float lanes[4];
    _mm_storeu_ps(lanes, peak4);
    float peak = 0.0f;
    for (int l = 0; l < 4; l++) peak = lanes[l] > peak ? lanes[l] : peak;
    for (; i < n; i++) peak = fabsf(x[i]) > peak ? fabsf(x[i]) : peak;
    if (!(peak > 0)) return 0;
    int e;
    frexp((double)peak, &e); /* peak = mant * 2**e with mant in [0.5, 1), so peak < 2**e */
    return (uint8_t)((e < EXPONENT_MIN ? EXPONENT_MIN : e) + EXPONENT_BIAS);
}

/* Python's max and min of two floats (NaN handling aside, which never arises here). */
static inline double py_max(double a, double b) { return b > a ? b : a; }
static inline double py_min(double a, double b) { return b < a ? b : a; }

/* quantize.scales of one exponent byte: m / 2**e, exact in float64. */
static inline double scale_of(const Transfer *t, uint8_t exponent) {
    return ldexp(t->peak_level, EXPONENT_BIAS - (int)exponent);
}

/* quantize.uniforms of one element: splitmix64(key + index), its top 53 bits times 2**-53. */
static inline double uniform(uint64_t key, uint64_t index) {
    uint64_t z = key + index + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1p-53;
}

/* quantize.quantize_block of element ``index`` of the call: rint(x * scale), or with stochastic
 * rounding floor(x * scale + u), clamped to [-m, m]. */
static inline int32_t level_of(const Transfer *t, float x, double scale, uint64_t index) {
    double scaled = (double)x * scale;
    if (t->stochastic) scaled = floor(scaled + uniform(t->noise_key, index));
    scaled = py_min(py_max(scaled, -t->peak_level), t->peak_level);
    return _mm_cvtsd_si32(_mm_set_sd(scaled));
}

/* Four int32 between host (little-endian) and wire (big-endian) order, with SSE2 alone. */
static inline __m128i swap4(__m128i v) {
    v = _mm_or_si128(_mm_slli_epi16(v, 8), _mm_srli_epi16(v, 8)); /* the bytes of each half */
    v = _mm_shufflelo_epi16(v, _MM_SHUFFLE(2, 3, 0, 1));          /* then the halves */
    return _mm_shufflehi_epi16(v, _MM_SHUFFLE(2, 3, 0, 1));
}

/* quantize.quantize_block into big-endian int32: rint(x * scale) clamped to [-m, m], four at a
 * time. cvtpd2dq rounds half to even (the default rounding mode), as numpy's rint does; the
 * clamp before rounding gives what numpy's clip after it does, m being an integer. */
static void quantize_into(uint8_t *dst, const float *x, size_t n, double scale, double m) {
    const __m128d scale2 = _mm_set1_pd(scale), hi2 = _mm_set1_pd(m), lo2 = _mm_set1_pd(-m);
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        __m128 f = _mm_loadu_ps(x + i);
        __m128d a = _mm_mul_pd(_mm_cvtps_pd(f), scale2);
        __m128d b = _mm_mul_pd(_mm_cvtps_pd(_mm_movehl_ps(f, f)), scale2);
        __m128i lo = _mm_cvtpd_epi32(_mm_min_pd(_mm_max_pd(a, lo2), hi2));
        __m128i hi = _mm_cvtpd_epi32(_mm_min_pd(_mm_max_pd(b, lo2), hi2));
        _mm_storeu_si128((__m128i *)(dst + i * ELEMENT_BYTES), swap4(_mm_unpacklo_epi64(lo, hi)));
    }
    for (; i < n; i++) {
        double scaled = py_min(py_max((double)x[i] * scale, -m), m);
        int32_t level = _mm_cvtsd_si32(_mm_set_sd(scaled));
        uint32_t big = __builtin_bswap32((uint32_t)level);
        memcpy(dst + i * ELEMENT_BYTES, &big, ELEMENT_BYTES);
    }
}

/* quantize.dequantize: float32 of (float64 sum) / scale, four at a time. */
static void dequantize_into(float *dst, const uint8_t *sums, size_t n, double scale) {
    const __m128d scale2 = _mm_set1_pd(scale);
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        __m128i v = swap4(_mm_loadu_si128((const __m128i *)(sums + i * ELEMENT_BYTES)));
        __m128d lo = _mm_div_pd(_mm_cvtepi32_pd(v), scale2);
        __m128d hi = _mm_div_pd(_mm_cvtepi32_pd(_mm_unpackhi_epi64(v, v)), scale2);
        _mm_storeu_ps(dst + i, _mm_movelh_ps(_mm_cvtpd_ps(lo), _mm_cvtpd_ps(hi)));
    }
    for (; i < n; i++) {
        uint32_t big;
        memcpy(&big, sums + i * ELEMENT_BYTES, ELEMENT_BYTES);
        dst[i] = (float)((double)(int32_t)__builtin_bswap32(big) / scale);
    }
}

/* quantize.to_lanes and wire.encode_lanes: rint(x * scale) + m in lanes of ``lane_bits``,
 * least significant lane first, into big-endian words (the last word's unused lanes zero).
 * Returns the words written. */
static size_t quantize_lanes_into(uint8_t *dst, const float *x, size_t n, double scale,
                                  const Transfer *t, uint64_t first) {
    const uint32_t bias = (uint32_t)t->peak_level;
    size_t words = (n + t->per_word - 1) / t->per_word;
    for (size_t w = 0; w < words; w++) {
        uint32_t word = 0;
        for (uint32_t i = 0; i < t->per_word && w * t->per_word + i < n; i++) {
            size_t e = w * t->per_word + i;
            int32_t level = level_of(t, x[e], scale, first + e);
            word |= ((uint32_t)level + bias) << (i * t->lane_bits);
        }
        wr32(dst + w * ELEMENT_BYTES, word);
    }
    return words;
}

/* wire.decode_lanes, quantize.from_lanes and quantize.dequantize: float32 of (lane sum - n * m)
 * / scale for the first ``n`` lanes. */
static void dequantize_lanes_into(float *dst, const uint8_t *sums, size_t n, double scale,
                                  const Transfer *t) {
    const uint32_t mask = (1u << t->lane_bits) - 1;
    for (size_t e = 0; e < n; e++) {
        uint32_t word = rd32(sums + e / t->per_word * ELEMENT_BYTES);
        uint32_t lane = word >> (e % t->per_word * t->lane_bits) & mask;
        dst[e] = (float)((double)((int64_t)lane - t->lane_bias) / scale);
    }
}

/* int32 elements between host order and the wire's big-endian order. */
static void copy_swapped(uint8_t *dst, const uint8_t *src, size_t n) {
    size_t i = 0;
    for (; i + 4 <= n; i += 4)
        _mm_storeu_si128((__m128i *)(dst + i * ELEMENT_BYTES),
                         swap4(_mm_loadu_si128((const __m128i *)(src + i * ELEMENT_BYTES))));
    for (; i < n; i++) {
        uint32_t v;
        memcpy(&v, src + i * ELEMENT_BYTES, ELEMENT_BYTES);
        v = __builtin_bswap32(v);
        memcpy(dst + i * ELEMENT_BYTES, &v, ELEMENT_BYTES);
    }
}

/* -- the round trip (window.RoundTrip) -------------------------------------------------------- */


static void sample_rtt(Transfer *t, double rtt) {
    t->min_rtt = t->has_min_rtt ? py_min(t->min_rtt, rtt) : rtt;
    t->has_min_rtt = 1;
    if (!t->has_srtt) {
        t->srtt = rtt;
        t->rttvar = rtt / 2;
        t->has_srtt = 1;
    } else {
        t->rttvar = 0.75 * t->rttvar + 0.25 * fabs(t->srtt - rtt);
        t->srtt = 0.875 * t->srtt + 0.125 * rtt;
    }
}

/* RoundTrip.rto: the timeout of a use resent ``retries`` times (doubled per retry, capped). */
static double rto(const Transfer *t, uint32_t retries) {
    double base = t->min_rto * 10; /* no sample yet: be patient */
    if (t->has_srtt) {
        double floor = py_max(t->min_rto, 2 * t->srtt);
        base = py_min(py_max(t->srtt + 4 * t->rttvar, floor), t->max_rto);
    }
    return py_min(ldexp(base, (int)retries), t->max_rto); /* base * 2**retries */
}

/* RoundTrip.reordering_window: a quarter of the smallest round trip (infinite before one). */
static double reordering_window(const Transfer *t) {
    return t->has_min_rtt ? t->min_rtt / 4 : INFINITY;
}

/* -- timers: window.py's heap of (deadline, slot, token) -------------------------------------
 * A slot has one live timer at most, so the live entries come out of window.py's heap in
 * (deadline, slot) order: this heap holds exactly those, indexed by slot. */

static inline int earlier(const Transfer *t, uint32_t a, uint32_t b) {
    double da = t->uses[a].deadline, db = t->uses[b].deadline;
    return da < db || (da == db && a < b);
}

static inline void heap_put(Transfer *t, uint32_t at, uint32_t slot) {
    t->heap[at] = slot;
    t->uses[slot].heap_at = (int32_t)at;
}

static void sift_up(Transfer *t, uint32_t at) {
    uint32_t slot = t->heap[at];
    while (at > 0) {
        uint32_t parent = (at - 1) / 2;
        if (!earlier(t, slot, t->heap[parent])) break;
        heap_put(t, at, t->heap[parent]);
        at = parent;
    }
    heap_put(t, at, slot);
}

static void sift_down(Transfer *t, uint32_t at) {
    uint32_t slot = t->heap[at];
    for (;;) {
        uint32_t child = 2 * at + 1;
        if (child >= t->nheap) break;
        if (child + 1 < t->nheap && earlier(t, t->heap[child + 1], t->heap[child])) child++;
        if (!earlier(t, t->heap[child], slot)) break;
        heap_put(t, at, t->heap[child]);
        at = child;
    }
    heap_put(t, at, slot);
}

static void timer_set(Transfer *t, uint32_t slot, double deadline) {
    use_t *u = &t->uses[slot];
    u->deadline = deadline;
    if (u->heap_at < 0) {
        heap_put(t, t->nheap++, slot);
        sift_up(t, t->nheap - 1);
    } else {
        sift_up(t, (uint32_t)u->heap_at);
        sift_down(t, (uint32_t)u->heap_at);
    }
}

static void timer_cancel(Transfer *t, uint32_t slot) {
    int32_t at = t->uses[slot].heap_at;
    if (at < 0) return;
    t->uses[slot].heap_at = -1;
    uint32_t last = t->heap[--t->nheap];
    if ((uint32_t)at < t->nheap) {
        heap_put(t, (uint32_t)at, last);
        sift_up(t, (uint32_t)at);
        sift_down(t, (uint32_t)t->uses[last].heap_at);
    }
}

/* -- the order of sending (window.py's _sent_order) ------------------------------------------ */

static void order_remove(Transfer *t, uint32_t slot) {
    use_t *u = &t->uses[slot];
    if (u->older >= 0) t->uses[u->older].newer = u->newer;
    else t->oldest = u->newer;
    if (u->newer >= 0) t->uses[u->newer].older = u->older;
    else t->newest = u->older;
    u->older = u->newer = -1;
}

/* The slot's use is now the most recently sent. */
static void order_latest(Transfer *t, uint32_t slot) {
    use_t *u = &t->uses[slot];
    if (t->newest == (int32_t)slot) return;
    if (u->older >= 0 || t->oldest == (int32_t)slot) order_remove(t, slot);
    u->older = t->newest;
    if (t->newest >= 0) t->uses[t->newest].newer = (int32_t)slot;
    else t->oldest = (int32_t)slot;
    t->newest = (int32_t)slot;
}

/* -- the window (window.Transfer) ------------------------------------------------------------ */

/* Transfer._arm: (re)start the use's timer, doubled ``backoff`` times; it is now the most
 * recently sent use. */
static void arm(Transfer *t, uint32_t slot, double now, uint32_t backoff) {
    use_t *u = &t->uses[slot];
    order_latest(t, slot);
    u->sent_at = now;
    timer_set(t, slot, now + rto(t, backoff));
}

/* A slot's packet joins the send queue (the packets of one call, in window.py's order). */
static void enqueue(Transfer *t, uint32_t slot) {
    if (t->nqueue == 2 * t->slots) t->drain(t, t->drain_context);
    t->uses[slot].queued = 1;
    t->queue[t->nqueue++] = slot;
}

/* window._release: a use's RELEASE (its header alone, typed RELEASE) joins the send queue. */
static void enqueue_release(Transfer *t, const uint8_t *packet) {
    if (t->nqueue == 2 * t->slots || t->nreleases == t->slots) t->drain(t, t->drain_context);
    uint8_t *h = t->releases + (size_t)t->nreleases * HEADER_BYTES;
    memcpy(h, packet, HEADER_BYTES);
    h[AT_MSG_TYPE] = MSG_RELEASE;
    t->queue[t->nqueue++] = RELEASE_ENTRY | t->nreleases++;
}

/* A queue entry's datagram and its length. */
static const uint8_t *queued_datagram(const Transfer *t, uint32_t entry, size_t *len) {
    if (entry & RELEASE_ENTRY) {
        *len = HEADER_BYTES;
        return t->releases + (size_t)(entry & ~RELEASE_ENTRY) * HEADER_BYTES;
    }
    *len = t->uses[entry].chunk == PRIME ? HEADER_BYTES : t->datagram; /* priming: a header */
    return t->packets + (size_t)entry * t->datagram;
}

/* Transfer._resend: the use's packet again, unchanged; its timer backs off (at least
 * ``backoff`` doublings). */
static void resend_backing_off(Transfer *t, uint32_t slot, double now, uint32_t backoff) {
    use_t *u = &t->uses[slot];
    u->retries++;
    u->held = 0;
    /* says so: the switch answers a late RESEND, not a late DATA */
    t->packets[(size_t)slot * t->datagram + AT_MSG_TYPE] = MSG_RESEND;
    t->stats[RETRANSMISSIONS]++;
    arm(t, slot, now, u->retries > backoff ? u->retries : backoff);
    enqueue(t, slot);
}

static void resend(Transfer *t, uint32_t slot, double now) { resend_backing_off(t, slot, now, 0); }

/* Transfer._end_stall: a result to ``answered`` came. If it answers a probe the switch did not
 * say WAITING to, the next held use is the next probe, sent at once; any other result ends the
 * stall: the held uses' timers start again. */
static void end_stall(Transfer *t, uint32_t answered, double now) {
    if (t->probe < 0) return; /* nothing is held without a probe out */
    uint32_t n = 0;
    for (int32_t s = t->oldest; s >= 0; s = t->uses[s].newer)
        if (s != (int32_t)answered && t->uses[s].held) t->held[n++] = (uint32_t)s;
    t->stalls = 0;
    if (t->probe == (int32_t)answered && !t->uses[answered].waiting && n > 0) {
        t->probe = (int32_t)t->held[0];
        resend(t, t->held[0], now);
        return;
    }
    t->probe = -1;
    for (uint32_t i = 0; i < n; i++) {
        use_t *u = &t->uses[t->held[i]];
        u->held = 0;
        timer_set(t, t->held[i], now + rto(t, u->retries));
    }
}

/* Transfer._overtake: the uses sent a reordering window or more before the answered one's first
 * sending are resent, oldest first (each then becomes the latest, behind the answered one). */
static void overtake(Transfer *t, uint32_t answered, double now) {
    double sent_by = t->uses[answered].first_sent_at - reordering_window(t);
    while (t->oldest >= 0 && t->oldest != (int32_t)answered &&
           !(t->uses[t->oldest].sent_at > sent_by)) {
        t->stats[FAST_RETRANSMISSIONS]++;
        resend(t, (uint32_t)t->oldest, now);
    }
}

/* Transfer._store: a result's sums into the output. */
static void store(Transfer *t, int64_t chunk, size_t count, const uint8_t *datagram) {
    size_t first = (size_t)chunk * t->chunk_elements;
    const uint8_t *sums = datagram + HEADER_BYTES;
    if (t->per_word > 1) {
        size_t n = t->length - first < t->chunk_elements ? t->length - first : t->chunk_elements;
        dequantize_lanes_into((float *)t->out.buf + first, sums, n,
                              scale_of(t, t->global_exp[chunk]), t);
    } else if (t->scaled)
        dequantize_into((float *)t->out.buf + first, sums, count,
                        scale_of(t, t->global_exp[chunk]));
    else
        copy_swapped((uint8_t *)t->out.buf + first * ELEMENT_BYTES, sums, count);
}

/* Transfer._holds_ours: whether a result's sums hold our contribution (its length: the ranks'). */
static inline int holds_ours(const Transfer *t, const uint8_t *d) {
    return t->rank < 32 && (rd32(d + AT_LENGTH) >> t->rank & 1);
}

/* Transfer._take: take a result for ``chunk`` (or a priming use) of ``slot``: the slot's next
 * chunk, or DONE_SLOT when it has nothing more to send in this call. */
static int64_t take_result(Transfer *t, uint32_t slot, int64_t chunk, const uint8_t *d) {
    t->results++;
    uint8_t exponent = d[AT_EXPONENT];
    if (chunk == PRIME) {
        t->global_exp[slot] = exponent;
        return slot;
    }
    store(t, chunk, rd16(d + AT_COUNT), d);
    if (!holds_ours(t, d)) { /* a quorum completed it without us */
        t->late[chunk] = 1;
        t->stats[LATE]++;
    }
    int64_t ahead = chunk + t->slot_count;
    if (ahead >= t->chunks) return DONE_SLOT;
    if (t->scaled) t->global_exp[ahead] = exponent;
    return ahead;
}

/* Transfer._finish: the slot has nothing more to send in this call. */
static void finish(Transfer *t, uint32_t slot) {
    use_t *u = &t->uses[slot];
    if (!u->active) return;
    u->active = 0;
    t->active--;
    timer_cancel(t, slot);
    order_remove(t, slot);
}

/* Transfer._switch_slot: the switch's slot that window slot ``slot`` uses in this call. */
static inline uint32_t switch_slot(const Transfer *t, uint32_t slot) {
    return (t->first_slot + slot) % t->slot_count;
}

/* Transfer._window_slot: the window slot that uses the switch's ``slot`` (< slot_count). */
static inline uint32_t window_slot(const Transfer *t, uint32_t slot) {
    return (slot + t->slot_count - t->first_slot) % t->slot_count;
}

/* Where the early result of a switch slot and version is kept (window.early_results). */
static uint8_t *early_entry(const Transfer *t, uint32_t slot, uint16_t round) {
    return (uint8_t *)t->early.buf + ((size_t)2 * slot + (round & 1u)) * t->datagram;
}

/* Transfer._keep_early: keep a RESULT of ours for one of the slot's next two rounds; 0 if the
 * datagram is no such result. */
static int keep_early(Transfer *t, const uint8_t *d, size_t len) {
    uint32_t slot = rd16(d + AT_VERSION_SLOT) & 0x7FFFu;
    if (t->contributors == t->world_size || d[AT_MSG_TYPE] != MSG_RESULT || slot >= t->slot_count ||
        (len == HEADER_BYTES) != (rd16(d + AT_COUNT) == 0))
        return 0; /* no round completes without us, no result, or a priming use's not alone */
    uint16_t ahead = (uint16_t)(rd16(d + AT_ROUND) - t->rounds[slot]);
    if (ahead < 1 || ahead > 2) return 0;
    memcpy(early_entry(t, slot, rd16(d + AT_ROUND)), d, len);
    return 1;
}

/* Transfer._early_result: the kept result of this use of window slot ``slot``, taken from the
 * store (its type cleared), or NULL. */
static const uint8_t *early_result(Transfer *t, uint32_t slot, uint16_t round,
                                   uint32_t wire_chunk, uint16_t count) {
    uint8_t *e = early_entry(t, switch_slot(t, slot), round);
    if (e[AT_MSG_TYPE] != MSG_RESULT || rd16(e + AT_JOB_ID) != t->job_id ||
        rd64(e + AT_SESSION) != t->session || rd16(e + AT_ROUND) != round ||
        rd32(e + AT_CHUNK) != wire_chunk || rd16(e + AT_COUNT) != count)
        return NULL;
    e[AT_MSG_TYPE] = 0;
    return e;
}

/* Transfer._send: start the next use of ``slot``; its packet carries ``chunk`` (or primes it). A
 * use whose result came early sends a RELEASE instead, and the slot goes on to its next. */
static void send_use(Transfer *t, uint32_t slot, int64_t chunk, double now) {
    use_t *u = &t->uses[slot];
    for (;;) {
        if (u->queued) t->drain(t, t->drain_context); /* its last packet goes before it changes */
        uint32_t at_switch = switch_slot(t, slot);
        uint16_t round = t->rounds[at_switch] = (uint16_t)(t->rounds[at_switch] + 1);
        uint8_t *p = t->packets + (size_t)slot * t->datagram;
        uint8_t *payload = p + HEADER_BYTES;
        size_t k = t->chunk_elements, count = 0, first = 0;
        uint8_t exponent;
        uint32_t wire_chunk;
        if (chunk == PRIME) {
            exponent = t->local_exp[slot];
            wire_chunk = at_switch;
        } else {
            int64_t ahead = chunk + t->slot_count;
            exponent = t->scaled && ahead < t->chunks ? t->local_exp[ahead] : 0;
            first = (size_t)chunk * k;
            count = t->length - first < k ? t->length - first : k;
            wire_chunk = (uint32_t)chunk;
        }
        size_t words = t->per_word > 1 ? (count + t->per_word - 1) / t->per_word : count;
        p[AT_MSG_TYPE] = MSG_DATA;
        p[AT_RANK] = t->rank;
        wr16(p + AT_JOB_ID, t->job_id);
        wr16(p + AT_VERSION_SLOT, (uint16_t)((round & 1u) << 15 | at_switch));
        p[AT_EXPONENT] = exponent;
        p[AT_FORMAT] = t->format;
        wr16(p + AT_ROUND, round);
        wr16(p + AT_COUNT, (uint16_t)words);
        wr32(p + AT_CHUNK, wire_chunk);
        wr32(p + AT_LENGTH, t->length);
        wr64(p + AT_SESSION, t->session);
        const uint8_t *early = early_result(t, slot, round, wire_chunk, (uint16_t)words);
        if (early != NULL) {
            enqueue_release(t, p);
            t->progress_at = now;
            chunk = take_result(t, slot, chunk, early);
            if (chunk == DONE_SLOT) {
                finish(t, slot);
                return;
            }
            continue;
        }
        if (chunk != PRIME) {
            if (t->per_word > 1)
                quantize_lanes_into(payload, (const float *)t->flat.buf + first, count,
                                    scale_of(t, t->global_exp[chunk]), t, first);
            else if (t->scaled && t->stochastic)
                for (size_t i = 0; i < count; i++)
                    wr32(payload + i * ELEMENT_BYTES,
                         (uint32_t)level_of(t, ((const float *)t->flat.buf)[first + i],
                                            scale_of(t, t->global_exp[chunk]), first + i));
            else if (t->scaled)
                quantize_into(payload, (const float *)t->flat.buf + first, count,
                              scale_of(t, t->global_exp[chunk]), t->peak_level);
            else
                copy_swapped(payload, (const uint8_t *)t->flat.buf + first * ELEMENT_BYTES, count);
        }
        if (chunk != PRIME) memset(payload + words * ELEMENT_BYTES, 0, (t->k - words) * ELEMENT_BYTES);
        if (!u->active) t->active++;
        u->chunk = chunk;
        u->wire_chunk = wire_chunk;
        u->round = round;
        u->count = (uint16_t)words;
        u->retries = 0;
        u->held = u->waiting = 0;
        u->first_sent_at = now;
        u->active = 1;
        arm(t, slot, now, 0);
        enqueue(t, slot);
        return;
    }
}

/* Transfer.start: the first use of every slot the tensor needs (a priming use for floats). */
static void core_start(Transfer *t, double now) {
    t->started = 1;
    t->progress_at = now;
    for (uint32_t slot = 0; slot < t->slots; slot++)
        send_use(t, slot, t->scaled ? PRIME : (int64_t)slot, now);
}

/* Transfer.receive: GOING (what to send is queued), or STALE or REFUSED (header in refusal). */
static int core_receive(Transfer *t, const uint8_t *d, size_t len, double now) {
    if (len != t->datagram && len != HEADER_BYTES) {
        t->stats[DUPLICATES]++;
        return GOING;
    }
    uint32_t at_switch = rd16(d + AT_VERSION_SLOT) & 0x7FFFu;
    uint32_t slot = at_switch < t->slot_count ? window_slot(t, at_switch) : t->slots;
    use_t *u = slot < t->slots && t->uses[slot].active ? &t->uses[slot] : NULL;
    int ours = rd16(d + AT_JOB_ID) == t->job_id && rd64(d + AT_SESSION) == t->session;
    if (!ours || u == NULL || rd16(d + AT_ROUND) != u->round ||
        rd32(d + AT_CHUNK) != u->wire_chunk ||
        len != (u->chunk == PRIME ? HEADER_BYTES : t->datagram)) {
        if (ours && keep_early(t, d, len)) return GOING;
        t->stats[DUPLICATES]++; /* a forger's packet echoed, an older run's, or a copy */
        return GOING;
    }
    if (d[AT_MSG_TYPE] == MSG_STALE) return STALE;
    if (d[AT_MSG_TYPE] == MSG_REFUSED) {
        memcpy(t->refusal, d, HEADER_BYTES);
        return REFUSED;
    }
    if (d[AT_MSG_TYPE] == MSG_WAITING) {
        t->stats[WAITS]++;
        u->waiting = 1;
        return GOING;
    }
    if (d[AT_MSG_TYPE] != MSG_RESULT || rd16(d + AT_COUNT) != u->count) {
        t->stats[DUPLICATES]++;
        return GOING;
    }
    t->progress_at = now;
    if (holds_ours(t, d)) { /* a result without us answers none of our packets */
        /* Karn's rule; a priming use's round trip (a header alone) is no full packet's */
        if (u->retries == 0 && u->chunk != PRIME) sample_rtt(t, now - u->sent_at);
        overtake(t, slot, now);
    }
    end_stall(t, slot, now);
    int64_t after = take_result(t, slot, u->chunk, d);
    if (after == DONE_SLOT) {
        finish(t, slot);
        /* a quorum's: say the sums are in, so the row may go */
        if (t->contributors < t->world_size) enqueue_release(t, t->packets + (size_t)slot * t->datagram);
        return GOING;
    }
    send_use(t, slot, after, now);
    return GOING;
}

/* Transfer.expire: the uses whose timeout has passed are held; the oldest held is resent as a
 * probe, unless a probe is still out within its own timeout. */
static void core_expire(Transfer *t, double now) {
    int timed_out = 0;
    while (t->nheap && t->uses[t->heap[0]].deadline <= now) {
        uint32_t slot = t->heap[0];
        timer_cancel(t, slot);
        t->uses[slot].held = 1;
        timed_out = 1;
    }
    if (!timed_out || (t->probe >= 0 && !t->uses[t->probe].held)) return;
    int32_t s = t->oldest;
    while (!t->uses[s].held) s = t->uses[s].newer;
    t->probe = s;
    t->stalls++;
    t->stats[TIMEOUTS]++;
    resend_backing_off(t, (uint32_t)s, now, t->stalls);
}

/* -- the socket loop (shim.py's _run) --------------------------------------------------------- */

typedef union {
    char buf[CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
} control_t;

typedef struct {
    PyObject_HEAD
    int fd;
    int busy;
    int gso_off;    /* the kernel or the route refused GSO: one datagram per message */
    int last_error; /* errno of the latest send that failed for another reason than a full buffer */
    uint8_t *rxbuf;
    struct mmsghdr rx[RX_BATCH];
    struct iovec rxiov[RX_BATCH];
    control_t rxcontrol[RX_BATCH];
    /* what to send: a queue's datagrams, contiguous, in messages of up to a GSO batch each */
    struct mmsghdr *tx;
    struct iovec *txiov;
    control_t *txcontrol;
    uint32_t *txfirst; /* a message's first datagram */
    size_t txcap;
} Driver;

static double monotonic(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

static int grow_tx(Driver *d, size_t cap) {
    if (cap <= d->txcap) return 0;
    struct mmsghdr *tx = realloc(d->tx, cap * sizeof *tx);
    if (tx) d->tx = tx;
    struct iovec *iov = realloc(d->txiov, cap * sizeof *iov);
    if (iov) d->txiov = iov;
    control_t *control = realloc(d->txcontrol, cap * sizeof *control);
    if (control) d->txcontrol = control;
    uint32_t *first = realloc(d->txfirst, cap * sizeof *first);
    if (first) d->txfirst = first;
    if (!tx || !iov || !control || !first) return -1;
    d->txcap = cap;
    return 0;
}

/* What sendmmsg says of a GSO message a device or route cannot take (a veth without it, a path
 * whose MTU is smaller than the datagrams): send datagram by datagram instead. */
static int refuses_gso(int err) {
    return err == EINVAL || err == EIO || err == ENOPROTOOPT || err == EMSGSIZE;
}

/* Send the ``n`` datagrams txiov holds, in order. A full buffer loses them, as a congested port
 * would (the window's timers resend); a socket error (an ICMP port unreachable while the switch
 * restarts, say) is kept for the stall report, as shim.py's _send keeps it. */
static void send_datagrams(Driver *d, Transfer *t, uint32_t n) {
    uint32_t at = 0;
    while (at < n) {
        size_t nmsg = 0;
        for (uint32_t i = at, count; i < n; i += count, nmsg++) {
            /* a GSO message holds datagrams of one size (DATA, or RELEASE headers) */
            size_t size = d->txiov[i].iov_len;
            uint32_t per = d->gso_off ? 1 : (uint32_t)(GSO_BYTES / size);
            per = per > GSO_SEGMENTS ? GSO_SEGMENTS : per < 1 ? 1 : per;
            count = 1;
            while (count < per && i + count < n && d->txiov[i + count].iov_len == size) count++;
            struct msghdr *h = &d->tx[nmsg].msg_hdr;
            *h = (struct msghdr){.msg_iov = &d->txiov[i], .msg_iovlen = count};
            d->txfirst[nmsg] = i;
            if (count > 1) {
                h->msg_control = d->txcontrol[nmsg].buf;
                h->msg_controllen = CMSG_SPACE(sizeof(uint16_t));
                struct cmsghdr *c = CMSG_FIRSTHDR(h);
                c->cmsg_level = SOL_UDP;
                c->cmsg_type = UDP_SEGMENT;
                c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
                uint16_t segment = (uint16_t)size;
                memcpy(CMSG_DATA(c), &segment, sizeof segment);
            }
        }
        size_t m = 0;
        at = n;
        while (m < nmsg) {
            int sent = sendmmsg(d->fd, d->tx + m, (unsigned)(nmsg - m), MSG_DONTWAIT);
            if (sent > 0) {
                for (size_t s = m; s < m + (size_t)sent; s++) {
                    size_t count = d->tx[s].msg_hdr.msg_iovlen;
                    t->stats[PACKETS_SENT] += count;
                    t->stats[BYTES_SENT] += count * d->tx[s].msg_hdr.msg_iov[0].iov_len;
                }
                m += (size_t)sent;
            } else if (errno == EINTR) {
                continue;
            } else if (d->tx[m].msg_hdr.msg_iovlen > 1 && refuses_gso(errno)) {
                d->gso_off = 1; /* no GSO here: the rest again, a datagram a message */
                at = d->txfirst[m];
                break;
            } else {
                if (errno != EAGAIN && errno != EWOULDBLOCK) d->last_error = errno;
                m++;
            }
        }
    }
}

/* Send what the window has queued (its drain while a driver runs it). */
static void flush(Transfer *t, void *context) {
    Driver *d = context;
    uint32_t n = t->nqueue;
    for (uint32_t i = 0; i < n; i++) {
        size_t len;
        const uint8_t *datagram = queued_datagram(t, t->queue[i], &len);
        d->txiov[i] = (struct iovec){(void *)datagram, len};
        if (!(t->queue[i] & RELEASE_ENTRY)) t->uses[t->queue[i]].queued = 0;
    }
    if (n) send_datagrams(d, t, n);
    t->nqueue = t->nreleases = 0;
}

/* The size of the datagrams a GRO message holds (the whole message if it is one datagram). */
static size_t segment_size(struct msghdr *h, size_t len) {
    for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c != NULL; c = CMSG_NXTHDR(h, c)) {
        if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO) {
            int size;
            memcpy(&size, CMSG_DATA(c), sizeof size);
            if (size > 0) return (size_t)size;
        }
    }
    return len;
}

/* Hand the window what arrived; STALE or REFUSED end the batch (what was queued is sent). */
static int take_batch(Driver *d, Transfer *t, int n, double now) {
    for (int m = 0; m < n; m++) {
        uint8_t *buf = d->rxbuf + (size_t)m * RX_ROOM;
        size_t len = d->rx[m].msg_len, segment = segment_size(&d->rx[m].msg_hdr, len), at = 0;
        do {
            size_t piece = len - at < segment ? len - at : segment;
            const uint8_t *p = buf + at;
            t->stats[PACKETS_RECEIVED]++;
            t->stats[BYTES_RECEIVED] += piece;
            int verdict = core_receive(t, p, piece, now);
            if (verdict != GOING) {
                flush(t, d);
                return verdict;
            }
            at += piece;
        } while (at < len);
    }
    flush(t, d);
    return GOING;
}

/* Drive the transfer until it is done (DONE), no result came for ``timeout`` seconds (STALLED),
 * the switch answered STALE or REFUSED, the socket failed (FAILED, errno in last_error), or a
 * signal arrived or CHECK_IN_S passed (CHECK_IN: Python runs its signal handlers, then the loop
 * goes on). Everything waiting is read before the timers are looked at, so that a late wake-up
 * does not resend what has come. With nothing to read it waits in poll() for the socket or the
 * next timer: the switch sends a rank each batch's results as one GSO message, so one wake-up
 * takes a batch (shim.py's loop sleeps instead, as a wake-up costs Python far more). Runs
 * without the GIL. */
static int drive(Driver *d, Transfer *t, double timeout) {
    t->drain = flush;
    t->drain_context = d;
    if (!t->started) {
        /* What came since the last call first: a quorum's results may be there already. */
        int n;
        do {
            for (int i = 0; i < RX_BATCH; i++) d->rx[i].msg_hdr.msg_controllen = sizeof(control_t);
            n = recvmmsg(d->fd, d->rx, RX_BATCH, MSG_DONTWAIT, NULL);
            int verdict = n > 0 ? take_batch(d, t, n, monotonic()) : GOING;
            if (verdict != GOING) return verdict;
        } while (n == RX_BATCH);
        core_start(t, monotonic());
        flush(t, d);
    }
    double check_in = monotonic() + CHECK_IN_S;
    for (;;) {
        if (t->active == 0) return DONE;
        for (int i = 0; i < RX_BATCH; i++) d->rx[i].msg_hdr.msg_controllen = sizeof(control_t);
        int n = recvmmsg(d->fd, d->rx, RX_BATCH, MSG_DONTWAIT, NULL);
        double now = monotonic();
        if (n > 0) {
            int verdict = take_batch(d, t, n, now);
            if (verdict != GOING) return verdict;
            if (n == RX_BATCH) continue; /* more may wait */
        } else if (errno == EINTR) {
            return CHECK_IN;
        } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != ECONNREFUSED) {
            d->last_error = errno; /* refused: the switch is not up yet; anything else ends it */
            return FAILED;
        }
        if (now - t->progress_at > timeout) return STALLED;
        core_expire(t, now);
        flush(t, d);
        if (now >= check_in) return CHECK_IN;
        if (n > 0) continue;
        double until = check_in; /* the next timer, the stall, or the check-in */
        if (t->nheap && t->uses[t->heap[0]].deadline < until) until = t->uses[t->heap[0]].deadline;
        if (t->progress_at + timeout < until) until = t->progress_at + timeout;
        struct pollfd readable = {d->fd, POLLIN, 0};
        int wait_ms = until > now ? (int)ceil((until - now) * 1e3) : 0;
        if (poll(&readable, 1, wait_ms) < 0) return CHECK_IN;
    }
}

/* -- the Python types ------------------------------------------------------------------------- */

static PyObject *StaleError, *RefusedError;

static void Transfer_dealloc(Transfer *self) {
    Py_XDECREF(self->taken);
    if (self->flat.obj) PyBuffer_Release(&self->flat);
    if (self->out.obj) PyBuffer_Release(&self->out);
    if (self->early.obj) PyBuffer_Release(&self->early);
    free(self->local_exp);
    free(self->global_exp);
    free(self->late);
    free(self->rounds);
    free(self->uses);
    free(self->packets);
    free(self->heap);
    free(self->queue);
    free(self->releases);
    free(self->held);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* float32 ('f') or int32 ('i'), one dimension of 4-byte items. */
static int element_kind(const Py_buffer *view) {
    if (view->itemsize != 4 || view->format == NULL || view->format[1] != '\0') return 0;
    return view->format[0] == 'f' || view->format[0] == 'i' ? view->format[0] : 0;
}

static int Transfer_init(Transfer *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"job_id", "rank", "world_size", "slot_count", "k", "session",
                             "precision_bits", "lane_bits", "noise_key", "format", "flat", "out", "rounds", "min_rto",
                             "max_rto", "srtt", "rttvar", "min_rtt", "contributors", "early", "first_slot", NULL};
    unsigned int job_id, rank, world_size, slot_count, k, bits, lane_bits, format, contributors,
        first_slot;
    unsigned long long session;
    PyObject *flat, *out, *rounds, *srtt, *min_rtt, *noise_key, *early;
    double min_rto, max_rto, rttvar;
    if (self->uses != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a transfer is initialized once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "IIIIIKIIOIOOOddOdOIOI", kwlist, &job_id, &rank,
                                     &world_size, &slot_count, &k, &session, &bits, &lane_bits,
                                     &noise_key, &format, &flat, &out, &rounds, &min_rto, &max_rto,
                                     &srtt, &rttvar, &min_rtt, &contributors, &early, &first_slot))
        return -1;
    if (job_id > 0xFFFF || rank > 0xFF || world_size == 0 || world_size > 32 ||
        contributors == 0 || contributors > world_size || slot_count == 0 ||
        slot_count > (1u << 15) || first_slot >= slot_count || k == 0 || k > 4096 || bits < 1 ||
        bits > 32 || format > 0xFF ||
        (lane_bits != 32 && lane_bits != 16 && lane_bits != 8) ||
        !(min_rto > 0) || !(max_rto >= min_rto)) {
        PyErr_SetString(PyExc_ValueError, "transfer parameters out of range");
        return -1;
    }
    if (PyObject_GetBuffer(flat, &self->flat, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0 ||
        PyObject_GetBuffer(out, &self->out, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0 ||
        PyObject_GetBuffer(early, &self->early, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        return -1;
    if ((size_t)self->early.len != (size_t)2 * slot_count * (HEADER_BYTES + k * ELEMENT_BYTES)) {
        PyErr_SetString(PyExc_ValueError, "early must hold a datagram per slot and version");
        return -1;
    }
    int kind = element_kind(&self->flat);
    if (kind == 'i' && lane_bits != 32) {
        PyErr_SetString(PyExc_TypeError, "int32 tensors are summed exactly, in 32-bit lanes only");
        return -1;
    }
    if (kind == 0 || element_kind(&self->out) != kind || self->out.len != self->flat.len ||
        self->flat.len / 4 > UINT32_MAX) {
        PyErr_SetString(PyExc_TypeError,
                        "flat and out must be float32 or int32 arrays of one type and length");
        return -1;
    }
    PyObject *seq = PySequence_Fast(rounds, "rounds must be a sequence");
    if (seq == NULL) return -1;
    if (PySequence_Fast_GET_SIZE(seq) != (Py_ssize_t)slot_count) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "rounds must hold one round per slot");
        return -1;
    }
    self->rounds = malloc(slot_count * sizeof *self->rounds);
    for (unsigned int s = 0; self->rounds && s < slot_count; s++) {
        long value = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, s));
        if (value == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        self->rounds[s] = (uint16_t)value;
    }
    Py_DECREF(seq);
    self->job_id = (uint16_t)job_id;
    self->rank = (uint8_t)rank;
    self->world_size = world_size;
    self->slot_count = slot_count;
    self->first_slot = first_slot;
    self->k = k;
    self->datagram = HEADER_BYTES + k * ELEMENT_BYTES;
    self->session = session;
    self->format = (uint8_t)format;
    self->lane_bits = lane_bits;
    self->per_word = 32 / lane_bits;
    self->chunk_elements = k * self->per_word;
    self->peak_level = lane_bits == 32 ? (double)(((1ull << (bits - 1)) - 1) / world_size)
                                       : (double)(((1ull << lane_bits) - 1) / (2 * world_size));
    self->lane_bias = (int64_t)contributors * (int64_t)self->peak_level;
    self->contributors = contributors;
    self->stochastic = noise_key != Py_None;
    self->noise_key = self->stochastic ? PyLong_AsUnsignedLongLong(noise_key) : 0;
    if (PyErr_Occurred()) return -1;
    self->scaled = kind == 'f';
    self->length = (uint32_t)(self->flat.len / 4);
    self->chunks =
        (uint32_t)(((uint64_t)self->length + self->chunk_elements - 1) / self->chunk_elements);
    self->slots = self->chunks < slot_count ? self->chunks : slot_count;
    self->min_rto = min_rto;
    self->max_rto = max_rto;
    self->has_srtt = srtt != Py_None;
    self->srtt = self->has_srtt ? PyFloat_AsDouble(srtt) : 0.0;
    self->rttvar = rttvar;
    self->has_min_rtt = min_rtt != Py_None;
    self->min_rtt = self->has_min_rtt ? PyFloat_AsDouble(min_rtt) : 0.0;
    if (PyErr_Occurred()) return -1;
    size_t slots = self->slots ? self->slots : 1, chunks = self->chunks ? self->chunks : 1;
    self->local_exp = calloc(chunks, 1);
    self->global_exp = calloc(chunks, 1);
    self->late = calloc(chunks, 1);
    self->uses = calloc(slots, sizeof *self->uses);
    self->packets = malloc(slots * self->datagram);
    self->heap = malloc(slots * sizeof *self->heap);
    self->queue = malloc(2 * slots * sizeof *self->queue);
    self->releases = malloc(slots * HEADER_BYTES);
    self->held = malloc(slots * sizeof *self->held);
    if (!self->rounds || !self->local_exp || !self->global_exp || !self->late || !self->uses ||
        !self->packets ||
        !self->heap || !self->queue || !self->releases || !self->held) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t s = 0; s < slots; s++)
        self->uses[s].heap_at = self->uses[s].older = self->uses[s].newer = -1;
    self->oldest = self->newest = self->probe = -1;
    if (self->scaled) {
        const float *x = self->flat.buf;
        Py_BEGIN_ALLOW_THREADS
        for (uint32_t c = 0; c < self->chunks; c++) {
            size_t e = self->chunk_elements, first = (size_t)c * e;
            size_t n = self->length - first < e ? self->length - first : e;
            self->local_exp[c] = block_exponent(x + first, n);
        }
        Py_END_ALLOW_THREADS
    }
    return 0;
}

static int check_idle(Transfer *self) {
    if (self->uses == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the transfer is not initialized");
        return -1;
    }
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "the transfer is running on a socket");
        return -1;
    }
    return 0;
}

/* The sans-IO methods' drain: the queued packets as bytes, in order, onto ``taken``. */
static void drain_to_bytes(Transfer *t, void *Py_UNUSED(context)) {
    for (uint32_t i = 0; i < t->nqueue; i++) {
        size_t len;
        const uint8_t *datagram = queued_datagram(t, t->queue[i], &len);
        if (!(t->queue[i] & RELEASE_ENTRY)) t->uses[t->queue[i]].queued = 0;
        if (t->taken == NULL) continue; /* out of memory: the error is set */
        PyObject *packet = PyBytes_FromStringAndSize((const char *)datagram, (Py_ssize_t)len);
        if (packet == NULL || PyList_Append(t->taken, packet) < 0) Py_CLEAR(t->taken);
        Py_XDECREF(packet);
    }
    t->nqueue = t->nreleases = 0;
}

/* Before a sans-IO step: what it sends will be collected as bytes. */
static int begin_step(Transfer *t) {
    if (check_idle(t) < 0 || (t->taken = PyList_New(0)) == NULL) return -1;
    t->drain = drain_to_bytes;
    t->drain_context = NULL;
    return 0;
}

/* After it: the packets it sent, in order (NULL with an error set if memory ran out). */
static PyObject *end_step(Transfer *t) {
    drain_to_bytes(t, NULL);
    PyObject *taken = t->taken;
    t->taken = NULL;
    return taken;
}

/* Raise what a STALE or REFUSED verdict means to the caller. */
static PyObject *raise_verdict(Transfer *self, int verdict) {
    if (verdict == STALE) {
        PyErr_SetNone(StaleError);
    } else {
        PyObject *header = PyBytes_FromStringAndSize((const char *)self->refusal, HEADER_BYTES);
        if (header != NULL) {
            PyErr_SetObject(RefusedError, header);
            Py_DECREF(header);
        }
    }
    return NULL;
}

static PyObject *Transfer_start(Transfer *self, PyObject *arg) {
    double now = PyFloat_AsDouble(arg);
    if (now == -1.0 && PyErr_Occurred()) return NULL;
    if (self->started) {
        PyErr_SetString(PyExc_RuntimeError, "the transfer has started");
        return NULL;
    }
    if (begin_step(self) < 0) return NULL;
    core_start(self, now);
    return end_step(self);
}

static PyObject *Transfer_receive(Transfer *self, PyObject *args) {
    Py_buffer datagram;
    double now;
    if (!PyArg_ParseTuple(args, "y*d", &datagram, &now)) return NULL;
    if (begin_step(self) < 0) {
        PyBuffer_Release(&datagram);
        return NULL;
    }
    int verdict = core_receive(self, datagram.buf, (size_t)datagram.len, now);
    PyBuffer_Release(&datagram);
    PyObject *sent = end_step(self);
    if (verdict == GOING) return sent;
    Py_XDECREF(sent); /* nothing: the verdict comes before anything is sent */
    return raise_verdict(self, verdict);
}

static PyObject *Transfer_expire(Transfer *self, PyObject *arg) {
    double now = PyFloat_AsDouble(arg);
    if ((now == -1.0 && PyErr_Occurred()) || begin_step(self) < 0) return NULL;
    core_expire(self, now);
    return end_step(self);
}

static PyObject *Transfer_next_deadline(Transfer *self, PyObject *Py_UNUSED(ignored)) {
    if (check_idle(self) < 0) return NULL;
    if (self->nheap == 0) Py_RETURN_NONE;
    return PyFloat_FromDouble(self->uses[self->heap[0]].deadline);
}

/* The indices of the chunks whose flag is set, as a list. */
static PyObject *chunks_flagged(const Transfer *self, const uint8_t *flags) {
    PyObject *list = PyList_New(0);
    for (uint32_t c = 0; list && c < self->chunks; c++) {
        if (!flags[c]) continue;
        PyObject *index = PyLong_FromUnsignedLong(c);
        if (index == NULL || PyList_Append(list, index) < 0) Py_CLEAR(list);
        Py_XDECREF(index);
    }
    return list;
}

static PyObject *Transfer_missing(Transfer *self, PyObject *Py_UNUSED(ignored)) {
    if (check_idle(self) < 0) return NULL;
    uint8_t *open = calloc(self->chunks ? self->chunks : 1, 1);
    if (open == NULL) return PyErr_NoMemory();
    for (uint32_t slot = 0; slot < self->slots; slot++) {
        const use_t *u = &self->uses[slot];
        if (!u->active) continue;
        int64_t first = u->chunk == PRIME ? slot : u->chunk;
        for (int64_t c = first; c < self->chunks; c += self->slot_count) open[c] = 1;
    }
    PyObject *list = chunks_flagged(self, open);
    free(open);
    return list;
}

static PyObject *Transfer_late(Transfer *self, PyObject *Py_UNUSED(ignored)) {
    if (check_idle(self) < 0) return NULL;
    return chunks_flagged(self, self->late);
}

static PyObject *Transfer_take_stats(Transfer *self, PyObject *Py_UNUSED(ignored)) {
    if (check_idle(self) < 0) return NULL;
    PyObject *stats = PyDict_New();
    for (int s = 0; stats && s < NUM_STATS; s++) {
        PyObject *value = PyLong_FromUnsignedLongLong(self->stats[s]);
        if (value == NULL || PyDict_SetItemString(stats, STAT_NAMES[s], value) < 0) Py_CLEAR(stats);
        Py_XDECREF(value);
    }
    if (stats) memset(self->stats, 0, sizeof self->stats);
    return stats;
}

static PyObject *Transfer_get_rounds(Transfer *self, void *Py_UNUSED(closure)) {
    if (check_idle(self) < 0) return NULL;
    PyObject *list = PyList_New(self->slot_count);
    for (uint32_t s = 0; list && s < self->slot_count; s++) {
        PyObject *round = PyLong_FromLong(self->rounds[s]);
        if (round == NULL) Py_CLEAR(list);
        else PyList_SET_ITEM(list, s, round);
    }
    return list;
}

static PyObject *Transfer_get_srtt(Transfer *self, void *Py_UNUSED(closure)) {
    if (!self->has_srtt) Py_RETURN_NONE;
    return PyFloat_FromDouble(self->srtt);
}

static PyObject *Transfer_get_rttvar(Transfer *self, void *Py_UNUSED(closure)) {
    return PyFloat_FromDouble(self->rttvar);
}

static PyObject *Transfer_get_min_rtt(Transfer *self, void *Py_UNUSED(closure)) {
    if (!self->has_min_rtt) Py_RETURN_NONE;
    return PyFloat_FromDouble(self->min_rtt);
}

static PyObject *Transfer_get_done(Transfer *self, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(self->active == 0);
}

static PyObject *Transfer_get_results(Transfer *self, void *Py_UNUSED(closure)) {
    return PyLong_FromUnsignedLongLong(self->results);
}

static PyObject *Transfer_get_progress_at(Transfer *self, void *Py_UNUSED(closure)) {
    return PyFloat_FromDouble(self->progress_at);
}

static PyObject *Transfer_get_chunks(Transfer *self, void *Py_UNUSED(closure)) {
    return PyLong_FromUnsignedLong(self->chunks);
}

static PyObject *Transfer_get_exponents(Transfer *self, void *Py_UNUSED(closure)) {
    if (check_idle(self) < 0) return NULL;
    return PyBytes_FromStringAndSize((const char *)self->global_exp, self->chunks);
}

static PyMethodDef Transfer_methods[] = {
    {"start", (PyCFunction)Transfer_start, METH_O, "The first use of every slot: packets."},
    {"receive", (PyCFunction)Transfer_receive, METH_VARARGS,
     "Take a datagram from the switch: packets to send; raises Stale or Refused."},
    {"expire", (PyCFunction)Transfer_expire, METH_O, "The uses whose timeout has passed."},
    {"next_deadline", (PyCFunction)Transfer_next_deadline, METH_NOARGS,
     "When expire may next resend something (None when nothing is out)."},
    {"missing", (PyCFunction)Transfer_missing, METH_NOARGS, "Chunks whose result has not come."},
    {"late", (PyCFunction)Transfer_late, METH_NOARGS, "Chunks whose sums came without ours."},
    {"take_stats", (PyCFunction)Transfer_take_stats, METH_NOARGS,
     "The counts since the last call, by WorkerStats field; they start again from zero."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Transfer_getset[] = {
    {"rounds", (getter)Transfer_get_rounds, NULL, "The last round used, per slot.", NULL},
    {"srtt", (getter)Transfer_get_srtt, NULL, "The smoothed round trip (None: no sample).", NULL},
    {"rttvar", (getter)Transfer_get_rttvar, NULL, "The round trip's variation.", NULL},
    {"min_rtt", (getter)Transfer_get_min_rtt, NULL, "The smallest round trip (None: none).", NULL},
    {"done", (getter)Transfer_get_done, NULL, "No use is out.", NULL},
    {"results", (getter)Transfer_get_results, NULL, "Results taken.", NULL},
    {"progress_at", (getter)Transfer_get_progress_at, NULL, "When the last result came.", NULL},
    {"chunks", (getter)Transfer_get_chunks, NULL, "Packets the tensor takes.", NULL},
    {"exponents", (getter)Transfer_get_exponents, NULL, "The agreed exponent byte per chunk.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TransferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "switchreduce.worker._window.Transfer",
    .tp_doc = PyDoc_STR("window.Transfer in C: one allreduce call, without I/O."),
    .tp_basicsize = sizeof(Transfer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Transfer_init,
    .tp_dealloc = (destructor)Transfer_dealloc,
    .tp_methods = Transfer_methods,
    .tp_getset = Transfer_getset,
};

static void Driver_dealloc(Driver *self) {
    free(self->rxbuf);
    free(self->tx);
    free(self->txiov);
    free(self->txcontrol);
    free(self->txfirst);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Driver_init(Driver *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"fd", NULL};
    if (self->rxbuf != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a driver is initialized once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i", kwlist, &self->fd)) return -1;
    self->rxbuf = malloc((size_t)RX_BATCH * RX_ROOM);
    if (self->rxbuf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < RX_BATCH; i++) {
        self->rxiov[i] = (struct iovec){self->rxbuf + (size_t)i * RX_ROOM, RX_ROOM};
        self->rx[i].msg_hdr = (struct msghdr){.msg_iov = &self->rxiov[i], .msg_iovlen = 1,
                                              .msg_control = self->rxcontrol[i].buf,
                                              .msg_controllen = sizeof(control_t)};
    }
    return 0;
}

/* UDP GRO on the socket while a transfer runs on it, and off again (shim.py reads it without). */
static void set_gro(int fd, int on) { setsockopt(fd, SOL_UDP, UDP_GRO, &on, sizeof on); }

static PyObject *Driver_run(Driver *self, PyObject *args) {
    Transfer *t;
    double timeout;
    if (!PyArg_ParseTuple(args, "O!d", &TransferType, &t, &timeout)) return NULL;
    if (self->rxbuf == NULL || check_idle(t) < 0) return NULL;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "the driver is running another transfer");
        return NULL;
    }
    if (!(timeout > 0)) {
        PyErr_SetString(PyExc_ValueError, "the timeout must be positive");
        return NULL;
    }
    if (grow_tx(self, t->slots ? 2 * (size_t)t->slots : 1) < 0) return PyErr_NoMemory();
    self->busy = t->running = 1;
    int verdict;
    set_gro(self->fd, 1);
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        verdict = drive(self, t, timeout);
        Py_END_ALLOW_THREADS
        if (verdict != CHECK_IN || PyErr_CheckSignals() < 0) break;
    }
    set_gro(self->fd, 0);
    self->busy = t->running = 0;
    if (verdict == CHECK_IN) return NULL; /* a signal handler raised */
    if (verdict == FAILED) {
        errno = self->last_error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (verdict == STALE || verdict == REFUSED) return raise_verdict(t, verdict);
    return PyBool_FromLong(verdict == DONE);
}

static PyObject *Driver_get_last_error(Driver *self, void *Py_UNUSED(closure)) {
    return PyLong_FromLong(self->last_error);
}

static PyMethodDef Driver_methods[] = {
    {"run", (PyCFunction)Driver_run, METH_VARARGS,
     "run(transfer, timeout): drive it on the socket, GIL released; True when done, "
     "False when no result came for timeout seconds; raises Stale or Refused."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Driver_getset[] = {
    {"last_error", (getter)Driver_get_last_error, NULL,
     "errno of the latest send that failed for another reason than a full buffer (0: none).",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject DriverType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "switchreduce.worker._window.Driver",
    .tp_doc = PyDoc_STR("Runs transfers on a connected non-blocking UDP socket (shim.py's _run)."),
    .tp_basicsize = sizeof(Driver),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Driver_init,
    .tp_dealloc = (destructor)Driver_dealloc,
    .tp_methods = Driver_methods,
    .tp_getset = Driver_getset,
};

static struct PyModuleDef window_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_window",
    .m_doc = "The worker's compiled window and socket loop (see worker/engine.py).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__window(void) {
    if (PyType_Ready(&TransferType) < 0 || PyType_Ready(&DriverType) < 0) return NULL;
    PyObject *m = PyModule_Create(&window_module);
    if (m == NULL) return NULL;
    StaleError = PyErr_NewExceptionWithDoc("switchreduce.worker._window.Stale",
                                           "The switch answered STALE for the transfer's session.",
                                           NULL, NULL);
    RefusedError = PyErr_NewExceptionWithDoc(
        "switchreduce.worker._window.Refused",
        "The switch refused the round; the argument is the REFUSED header.", NULL, NULL);
    if (StaleError == NULL || RefusedError == NULL ||
        PyModule_AddObjectRef(m, "Transfer", (PyObject *)&TransferType) < 0 ||
        PyModule_AddObjectRef(m, "Driver", (PyObject *)&DriverType) < 0 ||
        PyModule_AddObjectRef(m, "Stale", StaleError) < 0 ||
        PyModule_AddObjectRef(m, "Refused", RefusedError) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_BYTES", HEADER_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "ELEMENT_BYTES", ELEMENT_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "EXPONENT_BIAS", EXPONENT_BIAS) < 0 ||
        PyModule_AddIntConstant(m, "DATA", MSG_DATA) < 0 ||
        PyModule_AddIntConstant(m, "RESULT", MSG_RESULT) < 0 ||
        PyModule_AddIntConstant(m, "STALE", MSG_STALE) < 0 ||
        PyModule_AddIntConstant(m, "REFUSED", MSG_REFUSED) < 0 ||
        PyModule_AddIntConstant(m, "WAITING", MSG_WAITING) < 0 ||
        PyModule_AddIntConstant(m, "RELEASE", MSG_RELEASE) < 0 ||
        PyModule_AddIntConstant(m, "RESEND", MSG_RESEND) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
