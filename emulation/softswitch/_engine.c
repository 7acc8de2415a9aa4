/* The soft switch's compiled packet engine: the pipeline of pipeline.py in C, served in UDP mode
 * with batched system calls.
 *
 * pipeline.py stays the specification: this file implements the same parse, ingress (admission
 * checks in the same order, every drop reason counted alike, sessions, STALE and REFUSED
 * replies, the slot rows and their int32 sums), replication and egress, and tests/test_engine.py
 * feeds both the same packets and requires the same output, registers and counters.
 *
 * State. Registers and counters live in one arena the engine owns; it exports the arena through
 * the buffer protocol, and the Python Register and Counter objects of the same P4 names become
 * numpy views of their part of it (emulation/softswitch/engine.py), so whatever reads them reads
 * the engine. Tables and multicast groups are written through: the Python ExactTable keeps its
 * dict (what P4Runtime reads back) and hands every insert, modify and delete to the engine,
 * which keeps the lookup structure the data path needs (direct arrays for the 16-bit keys, a
 * hash table for the workers table's 81-bit key).
 *
 * I/O. serve() reads up to 64 datagrams per recvmmsg, runs them through the fault injector and
 * the pipeline, and sends what they emit with one sendmmsg, each destination's datagrams as UDP
 * GSO messages: on loopback the kernel's UDP stack, not the pipeline, is most of the switch's
 * CPU (perf: about 86% at K = 256), and GSO spares it a route lookup and a buffer per datagram.
 *
 * Threads. serve() runs with the GIL released and holds the engine's mutex while a batch goes
 * through the pipeline; every write from Python takes the same mutex, so a controller's
 * P4Runtime writes land between batches. The data path never takes the GIL.
 *
 * The wire layout is switchreduce/wire.py's; the module exports the constants it assumes and a
 * test compares them with wire's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define HEADER_BYTES 28
#define ELEMENT_BYTES 4
#define ROW_REFUSED 0xFF
#define MAX_WORKERS 32
#define KEYS16 65536 /* tables keyed by a 16-bit field are direct arrays */

enum { MSG_DATA = 1, MSG_RESULT = 2, MSG_JOIN = 3, MSG_STALE = 5, MSG_REFUSED = 6 };
enum {
    DROP_BAD_HEADER, DROP_UNKNOWN_JOB, DROP_RANK_OUT_OF_RANGE, DROP_SLOT_OUT_OF_RANGE,
    DROP_UNBOUND_WORKER, DROP_DUPLICATE, DROP_STALE, DROP_NO_ROUTE, DROP_BAD_SESSION,
    DROP_MISMATCH, NUM_DROP_REASONS
};
/* Counter arrays, in this order: drops, then the per-job ones (names.JobStat + 1). */
enum { C_DROPS, C_AGGREGATED, C_RESULTS, C_RETRANSMIT_REPLIES, NUM_COUNTERS };
/* Register arrays, in the arena's order (the value register, K cells a row, last). */
enum {
    R_SLOT_SESSION, R_ROUND, R_BITMAP, R_ARRIVALS, R_EXPONENT, R_ROW_FORMAT, R_ROW_LENGTH,
    R_ROW_CHUNK, R_VALUE, NUM_REGISTERS
};
/* Tables the data path looks up (the forward table only serves raw mode, which stays Python). */
enum { T_JOBS, T_WORKERS, T_RESULT_REWRITE, NUM_TABLES };

#define BATCH 64          /* datagrams per recvmmsg */
#define TX_QUEUE 512      /* datagrams per flush at most */
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103 /* linux/udp.h: UDP GSO, since Linux 4.18 */
#endif
#define GSO_SEGMENTS 64        /* the kernel's UDP_MAX_SEGMENTS */
#define GSO_BYTES (65535 - 28) /* one IPv4 UDP datagram's payload at most */
#define COALESCE_NS 200000 /* runtime.py's _COALESCE: sleep when the socket is empty */
#define IDLE_MS 5          /* runtime.py's _IDLE_MS: then this much silence flushes held packets */

typedef struct {
    uint8_t present, world_size;
    uint16_t slot_base, slot_count, mcast_grp;
    uint64_t session;
} job_t;

typedef struct {
    uint8_t present, rewrites; /* a hit with NoAction rewrites nothing */
    uint16_t udp_port;
    uint32_t ip;
} rewrite_t;

typedef struct {
    uint32_t port, rid;
} replica_t;

typedef struct {
    size_t count;
    replica_t replicas[];
} group_t;

typedef struct {
    uint64_t lo, hi;
} wkey_t;

/* A datagram to send: its bytes (a receive buffer rewritten in place, or a heap copy) and where. */
typedef struct {
    uint8_t *data;
    uint32_t len, ip;
    uint16_t port;
} out_t;

/* A growable list of datagrams that own their bytes (held by a fault injector, or punted). */
typedef struct {
    out_t *items;
    size_t count, cap;
} owned_t;

/* faults.py's FaultInjector: loss, duplication, reordering with the same probabilities. */
typedef struct {
    double loss, duplicate, reorder;
    uint64_t rng;
    unsigned long long dropped, duplicated, reordered;
    owned_t held;
} faults_t;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;
    uint32_t k, pool, rows, datagram;
    uint32_t counter_size[NUM_COUNTERS];
    /* the arena: registers and counters, exported to Python */
    uint8_t *arena;
    size_t arena_bytes;
    size_t offsets[NUM_REGISTERS + 2 * NUM_COUNTERS];
    uint64_t *slot_session;
    uint16_t *round;
    uint32_t *bitmap, *row_length, *row_chunk;
    uint8_t *arrivals, *exponent, *row_format;
    int32_t *value;
    uint64_t *packets[NUM_COUNTERS], *bytes[NUM_COUNTERS];
    /* tables */
    job_t *jobs;
    rewrite_t *rewrite;
    group_t **groups;
    wkey_t *wkeys;
    uint8_t *wused;
    uint32_t wmask, wcount;
    uint8_t punt[KEYS16 / 8]; /* job ids whose JOINs go to the CPU (a static job) */
    /* what the pipeline emits for one packet */
    out_t *outs;
    size_t nouts, outcap;
    /* serving */
    int serving;
    int error; /* errno of a send that failed for another reason than a full buffer */
    uint8_t *rxbuf;
    struct mmsghdr rx[BATCH];
    struct iovec rxiov[BATCH];
    struct sockaddr_in rxaddr[BATCH];
    /* what to send: queued in order, sent per destination as UDP GSO messages (segments of one
     * size, in their order), so the kernel routes and builds one buffer per message */
    out_t txq[TX_QUEUE];
    size_t ntx;
    int gso_off; /* the kernel or the route refused GSO: one datagram per message */
    uint32_t msg_of[TX_QUEUE]; /* the message each queued datagram goes in */
    struct mmsghdr tx[TX_QUEUE];
    struct iovec txiov[TX_QUEUE];
    struct sockaddr_in txaddr[TX_QUEUE];
    uint32_t tx_first[TX_QUEUE], tx_count[TX_QUEUE];
    union {
        char buf[CMSG_SPACE(sizeof(uint16_t))];
        struct cmsghdr align;
    } txcontrol[TX_QUEUE];
    owned_t scratch; /* heap bytes the queued datagrams point into, freed once sent */
    owned_t punted;
    faults_t ingress, egress;
    unsigned long long received, sent, tx_overruns;
} Engine;

/* -- bytes ---------------------------------------------------------------------------------- */

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static inline uint32_t rd32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return __builtin_bswap32(v);
}

static inline uint64_t rd64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return __builtin_bswap64(v);
}

/* -- owned lists ---------------------------------------------------------------------------- */

static int owned_push(owned_t *list, const uint8_t *data, uint32_t len, uint32_t ip, uint16_t port) {
    if (list->count == list->cap) {
        size_t cap = list->cap ? 2 * list->cap : 16;
        out_t *items = realloc(list->items, cap * sizeof(out_t));
        if (items == NULL) return -1;
        list->items = items;
        list->cap = cap;
    }
    uint8_t *copy = malloc(len ? len : 1);
    if (copy == NULL) return -1;
    memcpy(copy, data, len);
    list->items[list->count++] = (out_t){copy, len, ip, port};
    return 0;
}

/* Move every item of ``from`` to the end of ``to`` (ownership included). */
static int owned_move(owned_t *to, owned_t *from) {
    if (to->count + from->count > to->cap) {
        size_t cap = to->cap ? to->cap : 16;
        while (cap < to->count + from->count) cap *= 2;
        out_t *items = realloc(to->items, cap * sizeof(out_t));
        if (items == NULL) return -1;
        to->items = items;
        to->cap = cap;
    }
    memcpy(to->items + to->count, from->items, from->count * sizeof(out_t));
    to->count += from->count;
    from->count = 0;
    return 0;
}

static void owned_clear(owned_t *list) {
    for (size_t i = 0; i < list->count; i++) free(list->items[i].data);
    list->count = 0;
}

static void owned_free(owned_t *list) {
    owned_clear(list);
    free(list->items);
    list->items = NULL;
    list->cap = 0;
}

/* -- the workers table: open addressing, linear probing, backward-shift deletion ------------ */

static inline uint64_t wkey_hash(wkey_t key) {
    uint64_t h = key.lo * 0x9E3779B97F4A7C15ull ^ (key.hi + 0x632BE59BD9B4E019ull) * 0xC2B2AE3D27D4EB4Full;
    return h ^ (h >> 31);
}

static inline wkey_t worker_key(uint16_t job, uint8_t rank, uint32_t port, uint32_t ip, uint16_t sport) {
    return (wkey_t){(uint64_t)ip | (uint64_t)sport << 32 | (uint64_t)job << 48,
                    (uint64_t)rank | (uint64_t)port << 8};
}

/* The bucket holding ``key``, or -1. */
static long worker_find(const Engine *e, wkey_t key) {
    uint32_t i = (uint32_t)wkey_hash(key) & e->wmask;
    while (e->wused[i]) {
        if (e->wkeys[i].lo == key.lo && e->wkeys[i].hi == key.hi) return i;
        i = (i + 1) & e->wmask;
    }
    return -1;
}

static int worker_insert(Engine *e, wkey_t key) {
    if (worker_find(e, key) >= 0) return 0;
    if (e->wcount >= e->wmask) return -1; /* never: the Python table refuses past its size */
    uint32_t i = (uint32_t)wkey_hash(key) & e->wmask;
    while (e->wused[i]) i = (i + 1) & e->wmask;
    e->wkeys[i] = key;
    e->wused[i] = 1;
    e->wcount++;
    return 0;
}

static void worker_delete(Engine *e, wkey_t key) {
    long found = worker_find(e, key);
    if (found < 0) return;
    uint32_t hole = (uint32_t)found, j = hole;
    e->wused[hole] = 0;
    e->wcount--;
    for (;;) {
        j = (j + 1) & e->wmask;
        if (!e->wused[j]) return;
        uint32_t home = (uint32_t)wkey_hash(e->wkeys[j]) & e->wmask;
        /* the entry at j may move into the hole unless its home lies cyclically in (hole, j] */
        int stays = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!stays) {
            e->wkeys[hole] = e->wkeys[j];
            e->wused[hole] = 1;
            e->wused[j] = 0;
            hole = j;
        }
    }
}

/* -- the pipeline --------------------------------------------------------------------------- */

static int emit(Engine *e, uint8_t *data, uint32_t len, uint32_t ip, uint16_t port) {
    if (e->nouts == e->outcap) {
        size_t cap = e->outcap ? 2 * e->outcap : 64;
        out_t *outs = realloc(e->outs, cap * sizeof(out_t));
        if (outs == NULL) return -1;
        e->outs = outs;
        e->outcap = cap;
    }
    e->outs[e->nouts++] = (out_t){data, len, ip, port};
    return 0;
}

static inline void count(Engine *e, int counter, uint32_t index, uint32_t nbytes) {
    if (index < e->counter_size[counter]) { /* out-of-range indices are ignored, as BMv2 does */
        e->packets[counter][index]++;
        e->bytes[counter][index] += nbytes;
    }
}

/* PacketReplicationEngine then SwitchReduceEgress: one copy per replica of ``group``, each to
 * the worker its rid's result_rewrite entry names, else back where the packet came from. */
static int multicast(Engine *e, uint8_t *d, uint32_t len, uint16_t group, uint32_t ip, uint16_t port) {
    const group_t *g = e->groups[group];
    if (g == NULL) return 0;
    for (size_t i = 0; i < g->count; i++) {
        uint32_t rid = g->replicas[i].rid, to_ip = ip;
        uint16_t to_port = port;
        if (rid != 0 && rid < KEYS16 && e->rewrite[rid].rewrites) {
            to_ip = e->rewrite[rid].ip;
            to_port = e->rewrite[rid].udp_port;
        }
        if (emit(e, d, len, to_ip, to_port) < 0) return -1;
    }
    return 0;
}

/* Turn the packet into the row's result (header kept, but its type and the max exponent). */
static void make_result(const Engine *e, uint8_t *d, uint32_t row) {
    const int32_t *v = e->value + (size_t)row * e->k;
    uint8_t *p = d + HEADER_BYTES;
    d[0] = MSG_RESULT;
    d[6] = e->exponent[row];
    for (uint32_t i = 0; i < e->k; i++) {
        uint32_t be = __builtin_bswap32((uint32_t)v[i]);
        memcpy(p + 4 * i, &be, 4);
    }
}

#define PUNT 1

/* One UDP payload from (ip, port) through the pipeline; what it emits is appended to e->outs,
 * its bytes rewritten in place. Returns 0, PUNT for a static job's JOIN (the CPU answers it),
 * or -1 out of memory. */
static int pipeline(Engine *e, uint8_t *d, uint32_t len, uint32_t ip, uint16_t port) {
    if (len >= HEADER_BYTES && d[0] == MSG_JOIN && (e->punt[rd16(d + 2) >> 3] >> (rd16(d + 2) & 7) & 1))
        return PUNT;
    if (len != e->datagram || d[0] != MSG_DATA || rd16(d + 10) > e->k) {
        count(e, C_DROPS, DROP_BAD_HEADER, len);
        return 0;
    }
    uint8_t rank = d[1];
    uint16_t job_id = rd16(d + 2), vslot = rd16(d + 4);
    uint16_t slot = vslot & 0x7FFF, version = vslot >> 15;
    const job_t *job = &e->jobs[job_id];
    if (!job->present) {
        count(e, C_DROPS, DROP_UNKNOWN_JOB, len);
        return 0;
    }
    if (rank >= job->world_size) {
        count(e, C_DROPS, DROP_RANK_OUT_OF_RANGE, len);
        return 0;
    }
    uint32_t index = (uint32_t)job->slot_base + slot;
    if (slot >= job->slot_count || index >= e->pool) {
        count(e, C_DROPS, DROP_SLOT_OUT_OF_RANGE, len);
        return 0;
    }
    if (worker_find(e, worker_key(job_id, rank, 0, ip, port)) < 0) {
        count(e, C_DROPS, DROP_UNBOUND_WORKER, len);
        return 0;
    }
    uint64_t session = rd64(d + 20);
    if (session != job->session) { /* another run's packet, or a guess: tell the sender */
        count(e, C_DROPS, DROP_BAD_SESSION, len);
        d[0] = MSG_STALE;
        return emit(e, d, len, ip, port);
    }
    uint32_t row = 2 * index + version;
    uint16_t hround = rd16(d + 8);
    uint8_t hexp = d[6], hformat = d[7];
    uint32_t hchunk = rd32(d + 12), hlength = rd32(d + 16);
    if (e->slot_session[index] != session) { /* the session's first use of the slot */
        e->slot_session[index] = session;
        e->round[2 * index] = e->round[2 * index + 1] = (uint16_t)(hround - 1);
    }
    uint16_t ahead = (uint16_t)(hround - e->round[row]); /* serial-number order */
    uint32_t bit = rank < 32 ? (uint32_t)1 << rank : 0;  /* bit<32>: higher ranks have none */
    if (ahead >= 0x8000) {
        count(e, C_DROPS, DROP_STALE, len);
        return 0;
    }
    if (ahead == 0 && e->arrivals[row] == ROW_REFUSED) { /* the round was refused */
        count(e, C_DROPS, DROP_MISMATCH, len);
        d[0] = MSG_REFUSED;
        return emit(e, d, len, ip, port);
    }
    if (ahead == 0 && (e->bitmap[row] & bit)) {
        if (e->arrivals[row] != 0) {
            count(e, C_DROPS, DROP_DUPLICATE, len);
            return 0;
        }
        make_result(e, d, row); /* complete: the worker lost the result */
        count(e, C_RETRANSMIT_REPLIES, job_id, len);
        return emit(e, d, len, ip, port);
    }
    if (ahead == 0 && (e->row_format[row] != hformat || e->row_length[row] != hlength ||
                       e->row_chunk[row] != hchunk)) {
        e->arrivals[row] = ROW_REFUSED; /* ranks disagree: no rank may take this round's sums */
        count(e, C_DROPS, DROP_MISMATCH, len);
        d[0] = MSG_REFUSED;
        return multicast(e, d, len, job->mcast_grp, ip, port);
    }
    int32_t *v = e->value + (size_t)row * e->k;
    const uint8_t *p = d + HEADER_BYTES;
    uint32_t arrived;
    if (ahead) { /* the first packet of a new round writes */
        e->round[row] = hround;
        e->bitmap[row] = bit;
        arrived = 0;
        for (uint32_t i = 0; i < e->k; i++) v[i] = (int32_t)rd32(p + 4 * i);
        e->exponent[row] = hexp;
        e->row_format[row] = hformat;
        e->row_length[row] = hlength;
        e->row_chunk[row] = hchunk;
    } else { /* later ones add, wrapping modulo 2**32 as bit<32> does */
        e->bitmap[row] |= bit;
        arrived = e->arrivals[row];
        for (uint32_t i = 0; i < e->k; i++) v[i] = (int32_t)((uint32_t)v[i] + rd32(p + 4 * i));
        if (hexp > e->exponent[row]) e->exponent[row] = hexp;
    }
    arrived = arrived + 1 == job->world_size ? 0 : arrived + 1;
    e->arrivals[row] = (uint8_t)arrived;
    count(e, C_AGGREGATED, job_id, len);
    if (arrived != 0) return 0; /* consumed: its contribution is in the registers */
    make_result(e, d, row);
    count(e, C_RESULTS, job_id, len);
    return multicast(e, d, len, job->mcast_grp, ip, port);
}

/* -- faults --------------------------------------------------------------------------------- */

static double uniform(faults_t *f) { /* splitmix64, 53 bits into [0, 1) */
    uint64_t z = (f->rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1.0p-53;
}

#define HOLD 4

/* One packet's fate, drawn in FaultInjector.admit's order: 0 lost, else its copies (1 or 2),
 * with HOLD set if they wait for the next packet that passes. */
static int fate(faults_t *f) {
    if (f->loss > 0 && uniform(f) < f->loss) {
        f->dropped++;
        return 0;
    }
    int copies = 1;
    if (f->duplicate > 0 && uniform(f) < f->duplicate) {
        f->duplicated++;
        copies = 2;
    }
    if (f->reorder > 0 && uniform(f) < f->reorder) {
        f->reordered++;
        return copies | HOLD;
    }
    return copies;
}

/* -- serving -------------------------------------------------------------------------------- */

static int is_overrun(int err) {
    return err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS || err == ENETDOWN ||
           err == ENXIO || err == ENODEV;
}

/* sendmmsg the first ``count`` messages; one the socket buffer has no room for is lost (a
 * congested port), counted per datagram. Returns the index of a GSO message the kernel refused
 * (nothing from it on is sent), or ``count``. */
static size_t send_messages(Engine *e, int fd, size_t count) {
    size_t i = 0, end = count;
    while (i < end) {
        int sent = sendmmsg(fd, e->tx + i, (unsigned)(end - i), MSG_DONTWAIT);
        if (sent > 0) {
            for (int m = 0; m < sent; m++) e->sent += e->tx_count[i + (size_t)m];
            i += (size_t)sent;
        } else if (errno == EINTR) {
            continue;
        } else if (e->tx_count[i] > 1 && (errno == EINVAL || errno == EIO || errno == ENOPROTOOPT ||
                                          errno == EMSGSIZE)) {
            return i; /* no GSO here (a device without it, a route with a smaller MTU) */
        } else {
            if (is_overrun(errno))
                e->tx_overruns += e->tx_count[i];
            else if (!e->error)
                e->error = errno;
            i++;
        }
    }
    return count;
}

/* Send what is queued: each destination's datagrams of one size together, in their order. */
static void send_queued(Engine *e, int fd) {
    size_t nmsg = 0;
    for (size_t i = 0; i < e->ntx; i++) { /* which message: the destination's latest, if it fits */
        const out_t *o = &e->txq[i];
        size_t m = nmsg;
        for (size_t j = nmsg; !e->gso_off && j-- > 0 && nmsg - j <= 16;) {
            const out_t *head = &e->txq[e->tx_first[j]];
            if (head->ip == o->ip && head->port == o->port) {
                if (head->len == o->len && e->tx_count[j] < GSO_SEGMENTS &&
                    (e->tx_count[j] + 1) * o->len <= GSO_BYTES)
                    m = j;
                break;
            }
        }
        if (m == nmsg) {
            e->tx_first[nmsg] = (uint32_t)i; /* for now: the first datagram's index */
            e->tx_count[nmsg++] = 0;
        }
        e->msg_of[i] = (uint32_t)m;
        e->tx_count[m]++;
    }
    uint32_t at = 0;
    for (size_t m = 0; m < nmsg; m++) { /* each message's datagrams, contiguous */
        const out_t *head = &e->txq[e->tx_first[m]];
        struct sockaddr_in *to = &e->txaddr[m];
        to->sin_family = AF_INET;
        to->sin_port = htons(head->port);
        to->sin_addr.s_addr = htonl(head->ip);
        e->tx[m].msg_hdr = (struct msghdr){.msg_name = to, .msg_namelen = sizeof(*to),
                                           .msg_iov = &e->txiov[at], .msg_iovlen = 0};
        if (e->tx_count[m] > 1) {
            struct msghdr *h = &e->tx[m].msg_hdr;
            h->msg_control = e->txcontrol[m].buf;
            h->msg_controllen = sizeof(e->txcontrol[m].buf);
            struct cmsghdr *c = CMSG_FIRSTHDR(h);
            c->cmsg_level = SOL_UDP;
            c->cmsg_type = UDP_SEGMENT;
            c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t segment = (uint16_t)head->len;
            memcpy(CMSG_DATA(c), &segment, sizeof segment);
        }
        at += e->tx_count[m];
    }
    for (size_t i = 0; i < e->ntx; i++) {
        struct msghdr *h = &e->tx[e->msg_of[i]].msg_hdr;
        h->msg_iov[h->msg_iovlen++] = (struct iovec){e->txq[i].data, e->txq[i].len};
    }
    e->ntx = 0;
    size_t refused = send_messages(e, fd, nmsg);
    if (refused < nmsg) {
        /* GSO refused: from now on a datagram a message; the unsent ones again */
        e->gso_off = 1;
        for (size_t m = refused; m < nmsg; m++) {
            struct msghdr *h = &e->tx[m].msg_hdr;
            const struct sockaddr_in *to = h->msg_name;
            for (size_t v = 0; v < h->msg_iovlen; v++)
                e->txq[e->ntx++] = (out_t){h->msg_iov[v].iov_base, (uint32_t)h->msg_iov[v].iov_len,
                                           ntohl(to->sin_addr.s_addr), ntohs(to->sin_port)};
        }
        send_queued(e, fd);
    }
}

/* Send what is queued, then free the heap bytes it pointed into. */
static void flush_tx(Engine *e, int fd) {
    send_queued(e, fd);
    owned_clear(&e->scratch);
}

static void queue_tx(Engine *e, int fd, const out_t *o) {
    if (e->ntx == TX_QUEUE) send_queued(e, fd); /* scratch stays: later datagrams point into it */
    e->txq[e->ntx++] = *o;
}

/* An emitted datagram through the egress fault injector into the send queue. */
static int egress(Engine *e, int fd, const out_t *o) {
    int f = fate(&e->egress);
    for (int c = 0; c < (f & 3); c++) {
        if (f & HOLD) {
            if (owned_push(&e->egress.held, o->data, o->len, o->ip, o->port) < 0) return -1;
        } else {
            queue_tx(e, fd, o);
        }
    }
    if (f && !(f & HOLD) && e->egress.held.count) { /* held ones arrive after a later one */
        size_t first = e->scratch.count;
        if (owned_move(&e->scratch, &e->egress.held) < 0) return -1;
        for (size_t i = first; i < e->scratch.count; i++) queue_tx(e, fd, &e->scratch.items[i]);
    }
    return 0;
}

/* A received datagram through the pipeline, its output through egress; a punt is kept. */
static int ingress_one(Engine *e, int fd, uint8_t *d, uint32_t len, uint32_t ip, uint16_t port) {
    e->nouts = 0;
    int verdict = pipeline(e, d, len, ip, port);
    if (verdict < 0) return -1;
    if (verdict == PUNT) return owned_push(&e->punted, d, len, ip, port);
    for (size_t i = 0; i < e->nouts; i++)
        if (egress(e, fd, &e->outs[i]) < 0) return -1;
    return 0;
}

/* Process the packets ``list`` holds, in order; their bytes then belong to the scratch list. */
static int ingress_owned(Engine *e, int fd, owned_t *list) {
    size_t first = e->scratch.count;
    if (owned_move(&e->scratch, list) < 0) return -1;
    size_t last = e->scratch.count;
    for (size_t i = first; i < last; i++) {
        out_t item = e->scratch.items[i]; /* by value: processing may grow the scratch list */
        if (ingress_one(e, fd, item.data, item.len, item.ip, item.port) < 0) return -1;
    }
    return 0;
}

/* A received datagram through the ingress fault injector, then the pipeline. */
static int ingress(Engine *e, int fd, uint8_t *d, uint32_t len, uint32_t ip, uint16_t port) {
    int f = fate(&e->ingress);
    if (f == 0) return 0;
    if (f & HOLD) {
        for (int c = 0; c < (f & 3); c++)
            if (owned_push(&e->ingress.held, d, len, ip, port) < 0) return -1;
        return 0;
    }
    owned_t dup = {0};
    if (f == 2 && owned_push(&dup, d, len, ip, port) < 0) return -1; /* before d is rewritten */
    if (ingress_one(e, fd, d, len, ip, port) < 0 || ingress_owned(e, fd, &dup) < 0) {
        owned_free(&dup);
        return -1;
    }
    free(dup.items);
    return e->ingress.held.count ? ingress_owned(e, fd, &e->ingress.held) : 0;
}

/* Silence on the link: held packets go on (the ingress ones through the pipeline). */
static int release_held(Engine *e, int fd) {
    if (ingress_owned(e, fd, &e->ingress.held) < 0) return -1;
    size_t first = e->scratch.count;
    if (owned_move(&e->scratch, &e->egress.held) < 0) return -1;
    for (size_t i = first; i < e->scratch.count; i++) queue_tx(e, fd, &e->scratch.items[i]);
    return 0;
}

static double monotonic(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Serve ``fd`` until ``budget`` seconds have passed, the link has been idle IDLE_MS, a packet
 * waits for the CPU, or a signal arrives: then Python checks for a stop and answers punts.
 * Returns 0 or an errno. Runs without the GIL. */
static int serve_loop(Engine *e, int fd, double budget) {
    double deadline = monotonic() + budget;
    uint32_t room = e->datagram + 1; /* a spare byte exposes an oversized datagram */
    for (int i = 0; i < BATCH; i++) {
        e->rxiov[i] = (struct iovec){e->rxbuf + (size_t)i * room, room};
        e->rx[i].msg_hdr = (struct msghdr){.msg_name = &e->rxaddr[i],
                                           .msg_namelen = sizeof(e->rxaddr[i]),
                                           .msg_iov = &e->rxiov[i], .msg_iovlen = 1};
    }
    for (;;) {
        for (int i = 0; i < BATCH; i++) e->rx[i].msg_hdr.msg_namelen = sizeof(e->rxaddr[i]);
        int n = recvmmsg(fd, e->rx, BATCH, MSG_DONTWAIT, NULL);
        if (n > 0) {
            int failed = 0;
            pthread_mutex_lock(&e->lock);
            e->received += (unsigned)n;
            for (int i = 0; i < n && !failed; i++) {
                const struct sockaddr_in *from = &e->rxaddr[i];
                failed = ingress(e, fd, e->rxbuf + (size_t)i * room, e->rx[i].msg_len,
                                 ntohl(from->sin_addr.s_addr), ntohs(from->sin_port)) < 0;
            }
            flush_tx(e, fd);
            pthread_mutex_unlock(&e->lock);
            if (failed) return ENOMEM;
            if (e->error) return e->error;
            if (e->punted.count || monotonic() >= deadline) return 0;
            continue;
        }
        if (n < 0 && errno == EINTR) return 0;
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return errno;
        struct timespec nap = {0, COALESCE_NS};
        if (nanosleep(&nap, NULL) < 0) return 0; /* a signal */
        struct pollfd p = {fd, POLLIN, 0};
        int ready = poll(&p, 1, IDLE_MS);
        if (ready < 0) return errno == EINTR ? 0 : errno;
        if (ready == 0) {
            pthread_mutex_lock(&e->lock);
            int failed = release_held(e, fd) < 0;
            flush_tx(e, fd);
            pthread_mutex_unlock(&e->lock);
            if (failed) return ENOMEM;
            return e->error;
        }
        if (monotonic() >= deadline) return 0;
    }
}

/* -- the Python type ------------------------------------------------------------------------ */

static const char *const REGISTER_NAMES[NUM_REGISTERS] = {
    "slot_session", "round", "bitmap", "arrivals", "exponent", "row_format", "row_length",
    "row_chunk", "value",
};
static const char *const REGISTER_TYPES[NUM_REGISTERS] = {"u8", "u2", "u4", "u1", "u1", "u1", "u4",
                                                          "u4", "i4"};
static const size_t REGISTER_WIDTHS[NUM_REGISTERS] = {8, 2, 4, 1, 1, 1, 4, 4, 4};

/* Cells of register array ``r``: one a slot, one a row, or K a row. */
static size_t register_cells(const Engine *e, int r) {
    return r == R_SLOT_SESSION ? e->pool : r == R_VALUE ? (size_t)e->rows * e->k : e->rows;
}
static const char *const COUNTER_NAMES[NUM_COUNTERS] = {
    "drops", "aggregated", "results", "retransmit_replies",
};

static void Engine_dealloc(Engine *self) {
    free(self->arena);
    free(self->jobs);
    free(self->rewrite);
    if (self->groups)
        for (size_t g = 0; g < KEYS16; g++) free(self->groups[g]);
    free(self->groups);
    free(self->wkeys);
    free(self->wused);
    free(self->outs);
    free(self->rxbuf);
    owned_free(&self->scratch);
    owned_free(&self->punted);
    owned_free(&self->ingress.held);
    owned_free(&self->egress.held);
    pthread_mutex_destroy(&self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Engine_init(Engine *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"k", "pool_size", "max_jobs", "workers_size", NULL};
    unsigned int k, pool, max_jobs, workers_size;
    if (self->arena != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "an engine is initialized once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "IIII", kwlist, &k, &pool, &max_jobs, &workers_size))
        return -1;
    pthread_mutex_init(&self->lock, NULL); /* before anything dealloc may meet */
    if (k == 0 || k > 4096 || pool == 0 || pool > (1u << 15) || max_jobs == 0 || max_jobs > KEYS16 ||
        workers_size == 0 || workers_size > (1u << 24)) {
        PyErr_SetString(PyExc_ValueError, "engine sizes out of range");
        return -1;
    }
    self->k = k;
    self->pool = pool;
    self->rows = 2 * pool;
    self->datagram = HEADER_BYTES + k * ELEMENT_BYTES;
    self->counter_size[C_DROPS] = NUM_DROP_REASONS;
    for (int c = C_AGGREGATED; c < NUM_COUNTERS; c++) self->counter_size[c] = max_jobs;

    size_t at = 0, r = 0;
    for (; r < NUM_REGISTERS; r++) {
        self->offsets[r] = at;
        at = (at + register_cells(self, (int)r) * REGISTER_WIDTHS[r] + 63) & ~(size_t)63;
    }
    for (int c = 0; c < NUM_COUNTERS; c++)
        for (int part = 0; part < 2; part++, r++) {
            self->offsets[r] = at;
            at = (at + self->counter_size[c] * 8 + 63) & ~(size_t)63;
        }
    self->arena_bytes = at;
    self->arena = calloc(1, at);
    self->jobs = calloc(KEYS16, sizeof(job_t));
    self->rewrite = calloc(KEYS16, sizeof(rewrite_t));
    self->groups = calloc(KEYS16, sizeof(group_t *));
    uint32_t buckets = 16;
    while (buckets < 2 * workers_size) buckets *= 2;
    self->wmask = buckets - 1;
    self->wkeys = calloc(buckets, sizeof(wkey_t));
    self->wused = calloc(buckets, 1);
    self->rxbuf = malloc((size_t)BATCH * (self->datagram + 1));
    if (!self->arena || !self->jobs || !self->rewrite || !self->groups || !self->wkeys ||
        !self->wused || !self->rxbuf) {
        PyErr_NoMemory();
        return -1;
    }
    uint8_t *a = self->arena;
    self->slot_session = (uint64_t *)(a + self->offsets[R_SLOT_SESSION]);
    self->round = (uint16_t *)(a + self->offsets[R_ROUND]);
    self->bitmap = (uint32_t *)(a + self->offsets[R_BITMAP]);
    self->arrivals = a + self->offsets[R_ARRIVALS];
    self->exponent = a + self->offsets[R_EXPONENT];
    self->row_format = a + self->offsets[R_ROW_FORMAT];
    self->row_length = (uint32_t *)(a + self->offsets[R_ROW_LENGTH]);
    self->row_chunk = (uint32_t *)(a + self->offsets[R_ROW_CHUNK]);
    self->value = (int32_t *)(a + self->offsets[R_VALUE]);
    for (int c = 0; c < NUM_COUNTERS; c++) {
        self->packets[c] = (uint64_t *)(a + self->offsets[NUM_REGISTERS + 2 * c]);
        self->bytes[c] = (uint64_t *)(a + self->offsets[NUM_REGISTERS + 2 * c + 1]);
    }
    return 0;
}

static PyObject *Engine_layout(Engine *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyDict_New();
    if (out == NULL) return NULL;
    for (int r = 0; r < NUM_REGISTERS; r++) {
        PyObject *v = Py_BuildValue("(nns)", (Py_ssize_t)self->offsets[r],
                                    (Py_ssize_t)register_cells(self, r), REGISTER_TYPES[r]);
        if (v == NULL || PyDict_SetItemString(out, REGISTER_NAMES[r], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(v);
    }
    for (int c = 0; c < NUM_COUNTERS; c++)
        for (int part = 0; part < 2; part++) {
            char name[64];
            snprintf(name, sizeof name, "%s.%s", COUNTER_NAMES[c], part ? "bytes" : "packets");
            PyObject *v = Py_BuildValue("(nns)", (Py_ssize_t)self->offsets[NUM_REGISTERS + 2 * c + part],
                                        (Py_ssize_t)self->counter_size[c], "u8");
            if (v == NULL || PyDict_SetItemString(out, name, v) < 0) {
                Py_XDECREF(v);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(v);
        }
    return out;
}

static int Engine_getbuffer(Engine *self, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)self, self->arena, (Py_ssize_t)self->arena_bytes, 0,
                             flags);
}

/* ``key`` (a tuple of ints) into ``out``, each below 2**widths[i]. */
static int unpack_ints(PyObject *tuple, const int *widths, int n, uint64_t *out, const char *what) {
    if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected a tuple of %d ints", what, n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        unsigned long long v = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(tuple, i));
        if (PyErr_Occurred()) return -1;
        if (widths[i] < 64 && v >> widths[i]) {
            PyErr_Format(PyExc_ValueError, "%s: field %d is wider than %d bits", what, i, widths[i]);
            return -1;
        }
        out[i] = v;
    }
    return 0;
}

static const int JOBS_KEY[] = {16}, JOBS_ARGS[] = {8, 16, 16, 16, 64};
static const int WORKERS_KEY[] = {16, 8, 9, 32, 16};
static const int REWRITE_KEY[] = {16}, REWRITE_ARGS[] = {48, 32, 16};

static PyObject *Engine_write_entry(Engine *self, PyObject *args) {
    int table;
    PyObject *key, *params;
    if (!PyArg_ParseTuple(args, "iO!O", &table, &PyTuple_Type, &key, &params)) return NULL;
    int noaction = params == Py_None;
    uint64_t k[5], a[5] = {0};
    switch (table) {
    case T_JOBS:
        if (unpack_ints(key, JOBS_KEY, 1, k, "jobs key") < 0 ||
            (!noaction && unpack_ints(params, JOBS_ARGS, 5, a, "set_job") < 0))
            return NULL;
        pthread_mutex_lock(&self->lock);
        /* NoAction sets no metadata: P4 leaves it zero */
        self->jobs[k[0]] = (job_t){1, (uint8_t)a[0], (uint16_t)a[1], (uint16_t)a[2], (uint16_t)a[3], a[4]};
        pthread_mutex_unlock(&self->lock);
        break;
    case T_WORKERS: {
        if (unpack_ints(key, WORKERS_KEY, 5, k, "workers key") < 0) return NULL;
        pthread_mutex_lock(&self->lock); /* a hit admits, whichever action the entry has */
        int full = worker_insert(self, worker_key((uint16_t)k[0], (uint8_t)k[1], (uint32_t)k[2],
                                                  (uint32_t)k[3], (uint16_t)k[4])) < 0;
        pthread_mutex_unlock(&self->lock);
        if (full) {
            PyErr_SetString(PyExc_ValueError, "workers: the engine's table is full");
            return NULL;
        }
        break;
    }
    case T_RESULT_REWRITE:
        if (unpack_ints(key, REWRITE_KEY, 1, k, "result_rewrite key") < 0 ||
            (!noaction && unpack_ints(params, REWRITE_ARGS, 3, a, "rewrite_destination") < 0))
            return NULL;
        pthread_mutex_lock(&self->lock);
        self->rewrite[k[0]] = (rewrite_t){1, (uint8_t)!noaction, (uint16_t)a[2], (uint32_t)a[1]};
        pthread_mutex_unlock(&self->lock);
        break;
    default:
        PyErr_Format(PyExc_ValueError, "no table %d", table);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_delete_entry(Engine *self, PyObject *args) {
    int table;
    PyObject *key;
    uint64_t k[5];
    if (!PyArg_ParseTuple(args, "iO!", &table, &PyTuple_Type, &key)) return NULL;
    const int *widths = table == T_WORKERS ? WORKERS_KEY : table == T_JOBS ? JOBS_KEY : REWRITE_KEY;
    if (table < 0 || table >= NUM_TABLES) {
        PyErr_Format(PyExc_ValueError, "no table %d", table);
        return NULL;
    }
    if (unpack_ints(key, widths, table == T_WORKERS ? 5 : 1, k, "key") < 0) return NULL;
    pthread_mutex_lock(&self->lock);
    if (table == T_JOBS)
        self->jobs[k[0]].present = 0;
    else if (table == T_RESULT_REWRITE)
        self->rewrite[k[0]] = (rewrite_t){0};
    else
        worker_delete(self, worker_key((uint16_t)k[0], (uint8_t)k[1], (uint32_t)k[2], (uint32_t)k[3],
                                       (uint16_t)k[4]));
    pthread_mutex_unlock(&self->lock);
    Py_RETURN_NONE;
}

static PyObject *Engine_clear_table(Engine *self, PyObject *args) {
    int table;
    if (!PyArg_ParseTuple(args, "i", &table)) return NULL;
    if (table < 0 || table >= NUM_TABLES) {
        PyErr_Format(PyExc_ValueError, "no table %d", table);
        return NULL;
    }
    pthread_mutex_lock(&self->lock);
    if (table == T_JOBS) {
        memset(self->jobs, 0, KEYS16 * sizeof(job_t));
    } else if (table == T_RESULT_REWRITE) {
        memset(self->rewrite, 0, KEYS16 * sizeof(rewrite_t));
    } else {
        memset(self->wused, 0, (size_t)self->wmask + 1);
        self->wcount = 0;
    }
    pthread_mutex_unlock(&self->lock);
    Py_RETURN_NONE;
}

static PyObject *Engine_set_group(Engine *self, PyObject *args) {
    unsigned int gid;
    PyObject *replicas;
    if (!PyArg_ParseTuple(args, "IO", &gid, &replicas)) return NULL;
    if (gid >= KEYS16) {
        PyErr_SetString(PyExc_ValueError, "a multicast group id is 16 bits");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(replicas, "replicas must be a sequence of (port, rid)");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    group_t *g = malloc(sizeof(group_t) + (size_t)n * sizeof(replica_t));
    if (g == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    g->count = (size_t)n;
    static const int widths[] = {32, 32};
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t pr[2];
        if (unpack_ints(PySequence_Fast_GET_ITEM(seq, i), widths, 2, pr, "replica") < 0) {
            free(g);
            Py_DECREF(seq);
            return NULL;
        }
        g->replicas[i] = (replica_t){(uint32_t)pr[0], (uint32_t)pr[1]};
    }
    Py_DECREF(seq);
    pthread_mutex_lock(&self->lock);
    group_t *old = self->groups[gid];
    self->groups[gid] = g;
    pthread_mutex_unlock(&self->lock);
    free(old);
    Py_RETURN_NONE;
}

static PyObject *Engine_delete_group(Engine *self, PyObject *args) {
    unsigned int gid;
    if (!PyArg_ParseTuple(args, "I", &gid)) return NULL;
    if (gid >= KEYS16) Py_RETURN_NONE; /* never stored */
    pthread_mutex_lock(&self->lock);
    group_t *old = self->groups[gid];
    self->groups[gid] = NULL;
    pthread_mutex_unlock(&self->lock);
    free(old);
    Py_RETURN_NONE;
}

static int counter_arg(Engine *self, int counter, unsigned int index) {
    if (counter < 0 || counter >= NUM_COUNTERS) {
        PyErr_Format(PyExc_ValueError, "no counter %d", counter);
        return -1;
    }
    if (index >= self->counter_size[counter]) {
        PyErr_Format(PyExc_IndexError, "counter %s has %u cells", COUNTER_NAMES[counter],
                     self->counter_size[counter]);
        return -1;
    }
    return 0;
}

static PyObject *Engine_set_counter(Engine *self, PyObject *args) {
    int counter;
    unsigned int index;
    unsigned long long packets, nbytes;
    if (!PyArg_ParseTuple(args, "iIKK", &counter, &index, &packets, &nbytes)) return NULL;
    if (counter_arg(self, counter, index) < 0) return NULL;
    pthread_mutex_lock(&self->lock);
    self->packets[counter][index] = packets;
    self->bytes[counter][index] = nbytes;
    pthread_mutex_unlock(&self->lock);
    Py_RETURN_NONE;
}

static PyObject *Engine_count(Engine *self, PyObject *args) {
    int counter;
    long long index;
    unsigned int nbytes;
    if (!PyArg_ParseTuple(args, "iLI", &counter, &index, &nbytes)) return NULL;
    if (counter < 0 || counter >= NUM_COUNTERS) {
        PyErr_Format(PyExc_ValueError, "no counter %d", counter);
        return NULL;
    }
    if (index >= 0 && index <= UINT32_MAX) {
        pthread_mutex_lock(&self->lock);
        count(self, counter, (uint32_t)index, nbytes);
        pthread_mutex_unlock(&self->lock);
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_set_punted_jobs(Engine *self, PyObject *args) {
    PyObject *ids;
    if (!PyArg_ParseTuple(args, "O", &ids)) return NULL;
    PyObject *seq = PySequence_Fast(ids, "job ids must be a sequence");
    if (seq == NULL) return NULL;
    uint8_t punt[KEYS16 / 8] = {0};
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        unsigned long id = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(seq, i));
        if (PyErr_Occurred() || id >= KEYS16) {
            Py_DECREF(seq);
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a job id is 16 bits");
            return NULL;
        }
        punt[id >> 3] |= (uint8_t)(1 << (id & 7));
    }
    Py_DECREF(seq);
    pthread_mutex_lock(&self->lock);
    memcpy(self->punt, punt, sizeof punt);
    pthread_mutex_unlock(&self->lock);
    Py_RETURN_NONE;
}

static PyObject *Engine_set_faults(Engine *self, PyObject *args) {
    double loss, duplicate, reorder;
    long long seed;
    if (!PyArg_ParseTuple(args, "dddL", &loss, &duplicate, &reorder, &seed)) return NULL;
    pthread_mutex_lock(&self->lock);
    faults_t *sides[2] = {&self->ingress, &self->egress};
    for (int s = 0; s < 2; s++) { /* streams 1 and 2, as faults.py seeds them */
        sides[s]->loss = loss;
        sides[s]->duplicate = duplicate;
        sides[s]->reorder = reorder;
        sides[s]->rng = (uint64_t)seed * 1000003u + (uint64_t)(s + 1);
    }
    pthread_mutex_unlock(&self->lock);
    Py_RETURN_NONE;
}

static PyObject *Engine_process(Engine *self, PyObject *args) {
    Py_buffer data;
    unsigned int ip;
    unsigned short port;
    if (!PyArg_ParseTuple(args, "y*IH", &data, &ip, &port)) return NULL;
    uint8_t *copy = malloc(data.len ? (size_t)data.len : 1); /* rewritten in place */
    if (copy == NULL) {
        PyBuffer_Release(&data);
        return PyErr_NoMemory();
    }
    memcpy(copy, data.buf, (size_t)data.len);
    uint32_t len = (uint32_t)data.len;
    PyBuffer_Release(&data);
    pthread_mutex_lock(&self->lock);
    self->nouts = 0;
    int verdict = pipeline(self, copy, len, ip, port);
    PyObject *out = NULL;
    if (verdict < 0) {
        PyErr_NoMemory();
    } else if (verdict == PUNT) {
        out = Py_NewRef(Py_None);
    } else if ((out = PyList_New((Py_ssize_t)self->nouts)) != NULL) {
        for (size_t i = 0; i < self->nouts; i++) {
            const out_t *o = &self->outs[i];
            PyObject *item = Py_BuildValue("(IHy#)", o->ip, o->port, o->data, (Py_ssize_t)o->len);
            if (item == NULL) {
                Py_CLEAR(out);
                break;
            }
            PyList_SET_ITEM(out, (Py_ssize_t)i, item);
        }
    }
    pthread_mutex_unlock(&self->lock);
    free(copy);
    return out;
}

static PyObject *Engine_serve(Engine *self, PyObject *args) {
    int fd;
    double budget;
    if (!PyArg_ParseTuple(args, "id", &fd, &budget)) return NULL;
    if (self->serving) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is already serving");
        return NULL;
    }
    self->serving = 1;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = serve_loop(self, fd, budget);
    Py_END_ALLOW_THREADS
    self->serving = 0;
    self->error = 0;
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSize_t(self->punted.count);
}

static PyObject *Engine_take_punted(Engine *self, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&self->lock);
    PyObject *out = PyList_New((Py_ssize_t)self->punted.count);
    for (size_t i = 0; out != NULL && i < self->punted.count; i++) {
        const out_t *o = &self->punted.items[i];
        PyObject *item = Py_BuildValue("(y#IH)", o->data, (Py_ssize_t)o->len, o->ip, o->port);
        if (item == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, item);
    }
    if (out != NULL) owned_clear(&self->punted);
    pthread_mutex_unlock(&self->lock);
    return out;
}

static PyObject *Engine_transmit(Engine *self, PyObject *args) {
    int fd;
    unsigned int ip;
    unsigned short port;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "iIHy*", &fd, &ip, &port, &data)) return NULL;
    if (self->serving) { /* its queue and scratch belong to the serving loop */
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_RuntimeError, "transmit between serve calls, not during one");
        return NULL;
    }
    pthread_mutex_lock(&self->lock);
    out_t o = {data.buf, (uint32_t)data.len, ip, port};
    int failed = egress(self, fd, &o) < 0;
    flush_tx(self, fd);
    int err = self->error;
    self->error = 0;
    pthread_mutex_unlock(&self->lock);
    PyBuffer_Release(&data);
    if (failed) return PyErr_NoMemory();
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *fault_stats(const faults_t *f) {
    return Py_BuildValue("{sKsKsK}", "dropped", f->dropped, "duplicated", f->duplicated,
                         "reordered", f->reordered);
}

static PyObject *Engine_stats(Engine *self, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&self->lock);
    PyObject *out = Py_BuildValue("{sKsKsKsNsN}", "received", self->received, "sent", self->sent,
                                  "tx_overruns", self->tx_overruns, "ingress",
                                  fault_stats(&self->ingress), "egress", fault_stats(&self->egress));
    pthread_mutex_unlock(&self->lock);
    return out;
}

static PyMethodDef Engine_methods[] = {
    {"layout", (PyCFunction)Engine_layout, METH_NOARGS, NULL},
    {"write_entry", (PyCFunction)Engine_write_entry, METH_VARARGS, NULL},
    {"delete_entry", (PyCFunction)Engine_delete_entry, METH_VARARGS, NULL},
    {"clear_table", (PyCFunction)Engine_clear_table, METH_VARARGS, NULL},
    {"set_group", (PyCFunction)Engine_set_group, METH_VARARGS, NULL},
    {"delete_group", (PyCFunction)Engine_delete_group, METH_VARARGS, NULL},
    {"set_counter", (PyCFunction)Engine_set_counter, METH_VARARGS, NULL},
    {"count", (PyCFunction)Engine_count, METH_VARARGS, NULL},
    {"set_punted_jobs", (PyCFunction)Engine_set_punted_jobs, METH_VARARGS, NULL},
    {"set_faults", (PyCFunction)Engine_set_faults, METH_VARARGS, NULL},
    {"process", (PyCFunction)Engine_process, METH_VARARGS, NULL},
    {"serve", (PyCFunction)Engine_serve, METH_VARARGS, NULL},
    {"take_punted", (PyCFunction)Engine_take_punted, METH_NOARGS, NULL},
    {"transmit", (PyCFunction)Engine_transmit, METH_VARARGS, NULL},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyBufferProcs Engine_as_buffer = {(getbufferproc)Engine_getbuffer, NULL};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "switchreduce.emulation.softswitch._engine.Engine",
    .tp_doc = PyDoc_STR("The soft switch's pipeline and UDP data path in C (see engine.py)."),
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_as_buffer = &Engine_as_buffer,
};

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_engine",
    .m_doc = "The soft switch's compiled packet engine.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__engine(void) {
    if (PyType_Ready(&EngineType) < 0) return NULL;
    PyObject *m = PyModule_Create(&engine_module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_BYTES", HEADER_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "ROW_REFUSED", ROW_REFUSED) < 0 ||
        PyModule_AddIntConstant(m, "NUM_DROP_REASONS", NUM_DROP_REASONS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_WORKERS", MAX_WORKERS) < 0 ||
        PyModule_AddIntConstant(m, "JOBS", T_JOBS) < 0 ||
        PyModule_AddIntConstant(m, "WORKERS", T_WORKERS) < 0 ||
        PyModule_AddIntConstant(m, "RESULT_REWRITE", T_RESULT_REWRITE) < 0 ||
        PyModule_AddIntConstant(m, "BATCH", BATCH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *counters = Py_BuildValue("(ssss)", COUNTER_NAMES[0], COUNTER_NAMES[1],
                                       COUNTER_NAMES[2], COUNTER_NAMES[3]);
    if (counters == NULL || PyModule_AddObject(m, "COUNTERS", counters) < 0) {
        Py_XDECREF(counters);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
