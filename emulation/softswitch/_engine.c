/* The soft switch's compiled packet engine: the pipeline of pipeline.py in C, served with batched
 * system calls in UDP mode (one UDP socket) and in raw mode (one AF_PACKET socket per port).
 *
 * pipeline.py stays the specification: this file implements the same parse, ingress (admission
 * checks in the same order, every drop reason counted alike, sessions, STALE, REFUSED and WAITING
 * replies, the slot rows and their int32 sums, forwarding of other frames by destination MAC),
 * replication, egress and deparsing (raw mode: addresses swapped and rewritten per replica, the
 * IPv4 checksum recomputed, a zero UDP checksum). tests/test_engine.py feeds both the same
 * datagrams and tests/test_engine_raw.py the same frames, and both require the same output,
 * registers and counters.
 *
 * State. Registers and counters live in one arena the engine owns; it exports the arena through
 * the buffer protocol, and the Python Register and Counter objects of the same P4 names become
 * numpy views of their part of it (emulation/softswitch/engine.py), so whatever reads them reads
 * the engine. Tables and multicast groups are written through: the Python ExactTable keeps its
 * dict (what P4Runtime reads back) and hands every insert, modify and delete to the engine,
 * which keeps the lookup structure the data path needs (direct arrays for the 16-bit keys, hash
 * tables for the workers table's 81-bit key and the forward table's MACs).
 *
 * UDP mode. serve() reads up to 64 datagrams per recvmmsg, runs them through the fault injector
 * and the pipeline, and sends what they emit with one sendmmsg, each destination's datagrams as
 * UDP GSO messages: on loopback the kernel's UDP stack, not the pipeline, is most of the
 * switch's CPU (perf: about 86% at K = 256), and GSO spares it a route lookup and a buffer per
 * datagram.
 *
 * Raw mode. serve_frames() sweeps every port's socket with recvmmsg (64 frames a port, each
 * port into buffers of its own), runs the frames through the injector and the pipeline, then
 * sends each port's frames with one sendmmsg; an idle sweep sleeps and polls every port at
 * once. Frames are rewritten in place: a result's replicas share the received frame's payload
 * and differ in their own 42 bytes of Ethernet, IPv4 and UDP header (two iovecs a frame), so no
 * payload is copied. raw.py's sockets do not hear what they send (PACKET_IGNORE_OUTGOING; a
 * PACKET_OUTGOING frame is skipped should one come) and keep the qdisc (tc shapes the ports).
 * recvmmsg, not a PACKET_MMAP ring, by measurement: 1,100-byte frames from one veth end to a
 * reader of the other, 40,000 and 120,000 a second, CPU a frame of sender and reader together
 * (the copy into a ring runs in the sender's softirq). recvmmsg 5.7-6.2 us at 40,000/s and
 * 3.7-4.3 at 120,000/s; a TPACKET_V2 ring 5.3-5.8 and 3.5-3.8, within the noise of a shared
 * 2-core machine; TPACKET_V3 4.2-4.4 and 3.3-3.6, since it wakes the reader once a block, but
 * so it holds frames until a block is full or its timer (1 ms at least) fires: 0.35-0.5 ms more
 * latency a frame at 40,000/s (0.05-0.1 at 120,000/s), paid at every hop of every round. In
 * Mininet (4 hosts, 1 Gbit/s, MTU 9000, K = 1024, 4 M float32) the switch spent 0.24-0.27 s of
 * CPU an allreduce reading a V2 ring, 0.25-0.28 s with recvmmsg.
 *
 * Threads. A serving call runs with the GIL released and holds the engine's mutex while a batch
 * goes through the pipeline; every write from Python takes the same mutex, so a controller's
 * P4Runtime writes land between batches. The data path never takes the GIL.
 *
 * The wire layout is switchreduce/wire.py's; the module exports the constants it assumes and a
 * test compares them with wire's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stddef.h>
#include <linux/if_packet.h>
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

#define ETH_BYTES 14
#define IPV4_BYTES 20
#define UDP_BYTES 8
#define L2_L4_BYTES (ETH_BYTES + IPV4_BYTES + UDP_BYTES)
#define IP_AT ETH_BYTES
#define UDP_AT (ETH_BYTES + IPV4_BYTES)
#define ETHERTYPE_IPV4 0x0800
#define IP_PROTO_UDP 17
#define UDP_PORT_MIN 0xBEE0
#define UDP_PORT_MAX 0xBEEF
#define PORTS 512 /* switch ports are bit<9> */

enum {
    MSG_DATA = 1, MSG_RESULT = 2, MSG_JOIN = 3, MSG_STALE = 5, MSG_REFUSED = 6, MSG_WAITING = 7,
    MSG_RELEASE = 8,
    MSG_RESEND = 9
};
enum {
    DROP_BAD_HEADER, DROP_UNKNOWN_JOB, DROP_RANK_OUT_OF_RANGE, DROP_SLOT_OUT_OF_RANGE,
    DROP_UNBOUND_WORKER, DROP_DUPLICATE, DROP_STALE, DROP_NO_ROUTE, DROP_BAD_SESSION,
    DROP_MISMATCH, DROP_LATE, DROP_AHEAD, NUM_DROP_REASONS
};
/* Counter arrays, in this order: drops, then the per-job ones (names.JobStat + 1). */
enum { C_DROPS, C_AGGREGATED, C_RESULTS, C_RETRANSMIT_REPLIES, NUM_COUNTERS };
/* Register arrays, in the arena's order (the value register, K cells a row, last). */
enum {
    R_SLOT_SESSION, R_ROUND, R_BITMAP, R_ARRIVALS, R_EXPONENT, R_ROW_FORMAT, R_ROW_LENGTH,
    R_ROW_CHUNK, R_SEEN, R_VALUE, NUM_REGISTERS
};
/* Tables the data path looks up. */
enum { T_JOBS, T_WORKERS, T_RESULT_REWRITE, T_FORWARD, NUM_TABLES };

#define BATCH 64          /* datagrams or frames per recvmmsg */
#define TX_QUEUE 512      /* datagrams or frames per flush at most */
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103 /* linux/udp.h: UDP GSO, since Linux 4.18 */
#endif
#define GSO_SEGMENTS 64        /* the kernel's UDP_MAX_SEGMENTS */
#define GSO_BYTES (65535 - 28) /* one IPv4 UDP datagram's payload at most */
#define COALESCE_NS 200000 /* runtime.py's _COALESCE: sleep when the sockets are empty */
#define IDLE_MS 5          /* runtime.py's _IDLE_MS: then this much silence flushes held packets */

typedef struct {
    uint8_t present, world_size, quorum;
    uint16_t slot_base, slot_count, mcast_grp;
    uint64_t session;
} job_t;

typedef struct {
    uint8_t present, rewrites; /* a hit with NoAction rewrites nothing */
    uint16_t udp_port;
    uint32_t ip;
    uint64_t mac;
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
} hkey_t;

/* An exact-match table on a key of up to 128 bits with a 16-bit value: open addressing, linear
 * probing, backward-shift deletion. */
typedef struct {
    hkey_t *keys;
    uint16_t *values;
    uint8_t *used;
    uint32_t mask, count;
} hash_t;

/* A packet as the parser leaves it. UDP mode: the datagram, from an IPv4 address and UDP port,
 * on ingress port 0. Raw mode: an Ethernet frame whose UDP payload starts at L2_L4_BYTES. */
typedef struct {
    uint8_t *frame;      /* raw mode: the frame, rewritten in place into an answer; else NULL */
    uint8_t *d;          /* the UDP payload */
    uint32_t avail;      /* the payload's bytes, as received */
    uint32_t udp_length; /* the UDP header's length */
    uint32_t wire_len;   /* what counters count: the frame, or the datagram */
    uint32_t ip;         /* IPv4 source */
    uint16_t sport;      /* UDP source port */
    uint16_t port;       /* ingress port */
} pkt_t;

/* A datagram or frame to send, or one received and kept: its bytes (a receive buffer rewritten
 * in place, or a heap copy), and where it goes (or came from). */
typedef struct {
    uint8_t *data;
    uint32_t len;
    uint32_t ip;       /* UDP mode: the destination's address and port */
    uint16_t udp_port;
    uint16_t port;     /* raw mode: the switch port it leaves by (received: came in by) */
    uint8_t own_head;  /* raw mode: its first L2_L4_BYTES are ``head``, the rest data's */
    uint8_t head[L2_L4_BYTES];
} out_t;

/* A growable list of packets that own their bytes (held by a fault injector, or punted). */
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

/* Raw mode: one switch port's socket and its receive buffers. */
typedef struct {
    int fd;
    uint16_t number;
    uint8_t down; /* its link went away: no longer served */
    uint8_t *rxbuf;
} port_t;

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
    uint32_t *bitmap, *row_length, *row_chunk, *seen;
    uint8_t *arrivals, *exponent, *row_format;
    int32_t *value;
    uint64_t *packets[NUM_COUNTERS], *bytes[NUM_COUNTERS];
    /* tables */
    job_t *jobs;
    rewrite_t *rewrite;
    group_t **groups;
    hash_t workers, forward;
    uint8_t punt[KEYS16 / 8]; /* job ids whose JOINs go to the CPU (a static job) */
    /* what the pipeline emits for one packet */
    out_t *outs;
    size_t nouts, outcap;
    /* serving: UDP mode's socket, or raw mode's ports */
    int serving;
    int raw;
    int udp_fd;
    int error; /* errno of a send that failed for another reason than a full buffer */
    uint8_t *rxbuf;
    port_t *ports;
    size_t nports;
    uint32_t frame_room;      /* receive buffer bytes a frame */
    int16_t port_index[PORTS]; /* switch port -> its index in ports, or -1 */
    struct mmsghdr rx[BATCH];
    struct iovec rxiov[BATCH];
    union {
        struct sockaddr_in in;
        struct sockaddr_ll ll;
    } rxaddr[BATCH];
    /* what to send, queued in order. UDP mode: per destination as UDP GSO messages (segments of
     * one size, in their order), so the kernel routes and builds one buffer per message. Raw
     * mode: per port, a frame a message. */
    out_t txq[TX_QUEUE];
    size_t ntx;
    int gso_off; /* the kernel or the route refused GSO: one datagram per message */
    uint32_t msg_of[TX_QUEUE]; /* the message each queued datagram goes in */
    struct mmsghdr tx[TX_QUEUE];
    struct iovec txiov[2 * TX_QUEUE];
    struct sockaddr_in txaddr[TX_QUEUE];
    uint32_t tx_first[TX_QUEUE], tx_count[TX_QUEUE];
    union {
        char buf[CMSG_SPACE(sizeof(uint16_t))];
        struct cmsghdr align;
    } txcontrol[TX_QUEUE];
    owned_t scratch; /* heap bytes the queued packets point into, freed once sent */
    owned_t punted;
    faults_t ingress, egress;
    unsigned long long received, sent, tx_overruns, truncated;
} Engine;

/* -- bytes ---------------------------------------------------------------------------------- */

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static inline uint32_t rd32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return __builtin_bswap32(v);
}

static inline uint64_t rd48(const uint8_t *p) { return (uint64_t)rd16(p) << 32 | rd32(p + 2); }

static inline uint64_t rd64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return __builtin_bswap64(v);
}

static inline void wr16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void wr32(uint8_t *p, uint32_t v) {
    v = __builtin_bswap32(v);
    memcpy(p, &v, 4);
}

static inline void wr48(uint8_t *p, uint64_t v) {
    wr16(p, (uint16_t)(v >> 32));
    wr32(p + 2, (uint32_t)v);
}

static inline void swap_bytes(uint8_t *a, uint8_t *b, size_t n) {
    uint8_t t[8];
    memcpy(t, a, n);
    memcpy(a, b, n);
    memcpy(b, t, n);
}

/* -- owned lists ---------------------------------------------------------------------------- */

/* A copy of ``o`` that owns its bytes (its own header, if it has one, written in). */
static int owned_push(owned_t *list, const out_t *o) {
    if (list->count == list->cap) {
        size_t cap = list->cap ? 2 * list->cap : 16;
        out_t *items = realloc(list->items, cap * sizeof(out_t));
        if (items == NULL) return -1;
        list->items = items;
        list->cap = cap;
    }
    uint8_t *copy = malloc(o->len ? o->len : 1);
    if (copy == NULL) return -1;
    memcpy(copy, o->data, o->len);
    if (o->own_head) memcpy(copy, o->head, L2_L4_BYTES);
    out_t *item = &list->items[list->count++];
    *item = *o;
    item->data = copy;
    item->own_head = 0;
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

/* -- hash tables: the workers table and the forward table ----------------------------------- */

static inline uint64_t hkey_hash(hkey_t key) {
    uint64_t h = key.lo * 0x9E3779B97F4A7C15ull ^ (key.hi + 0x632BE59BD9B4E019ull) * 0xC2B2AE3D27D4EB4Full;
    return h ^ (h >> 31);
}

static inline hkey_t worker_key(uint16_t job, uint8_t rank, uint32_t port, uint32_t ip, uint16_t sport) {
    return (hkey_t){(uint64_t)ip | (uint64_t)sport << 32 | (uint64_t)job << 48,
                    (uint64_t)rank | (uint64_t)port << 8};
}

static inline hkey_t mac_key(uint64_t mac) { return (hkey_t){mac, 0}; }

/* Room for ``size`` entries at most half full. */
static int hash_init(hash_t *h, uint32_t size) {
    uint32_t buckets = 16;
    while (buckets < 2 * size) buckets *= 2;
    h->mask = buckets - 1;
    h->count = 0;
    h->keys = calloc(buckets, sizeof(hkey_t));
    h->values = calloc(buckets, sizeof(uint16_t));
    h->used = calloc(buckets, 1);
    return h->keys && h->values && h->used ? 0 : -1;
}

static void hash_free(hash_t *h) {
    free(h->keys);
    free(h->values);
    free(h->used);
}

/* The bucket holding ``key``, or -1. */
static long hash_find(const hash_t *h, hkey_t key) {
    uint32_t i = (uint32_t)hkey_hash(key) & h->mask;
    while (h->used[i]) {
        if (h->keys[i].lo == key.lo && h->keys[i].hi == key.hi) return i;
        i = (i + 1) & h->mask;
    }
    return -1;
}

/* Insert or replace; -1 when full (never: the Python table refuses entries past its size). */
static int hash_put(hash_t *h, hkey_t key, uint16_t value) {
    long found = hash_find(h, key);
    if (found >= 0) {
        h->values[found] = value;
        return 0;
    }
    if (h->count >= h->mask) return -1;
    uint32_t i = (uint32_t)hkey_hash(key) & h->mask;
    while (h->used[i]) i = (i + 1) & h->mask;
    h->keys[i] = key;
    h->values[i] = value;
    h->used[i] = 1;
    h->count++;
    return 0;
}

static void hash_delete(hash_t *h, hkey_t key) {
    long found = hash_find(h, key);
    if (found < 0) return;
    uint32_t hole = (uint32_t)found, j = hole;
    h->used[hole] = 0;
    h->count--;
    for (;;) {
        j = (j + 1) & h->mask;
        if (!h->used[j]) return;
        uint32_t home = (uint32_t)hkey_hash(h->keys[j]) & h->mask;
        /* the entry at j may move into the hole unless its home lies cyclically in (hole, j] */
        int stays = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!stays) {
            h->keys[hole] = h->keys[j];
            h->values[hole] = h->values[j];
            h->used[hole] = 1;
            h->used[j] = 0;
            hole = j;
        }
    }
}

static void hash_clear(hash_t *h) {
    memset(h->used, 0, (size_t)h->mask + 1);
    h->count = 0;
}

/* -- the pipeline --------------------------------------------------------------------------- */

static int emit(Engine *e, const out_t *o) {
    if (e->nouts == e->outcap) {
        size_t cap = e->outcap ? 2 * e->outcap : 64;
        out_t *outs = realloc(e->outs, cap * sizeof(out_t));
        if (outs == NULL) return -1;
        e->outs = outs;
        e->outcap = cap;
    }
    out_t *slot = &e->outs[e->nouts++];
    memcpy(slot, o, o->own_head ? sizeof(out_t) : offsetof(out_t, head));
    return 0;
}

static inline void count(Engine *e, int counter, uint32_t index, uint32_t nbytes) {
    if (index < e->counter_size[counter]) { /* out-of-range indices are ignored, as BMv2 does */
        e->packets[counter][index]++;
        e->bytes[counter][index] += nbytes;
    }
}

/* The ones' complement checksum of the IPv4 header at ``ip``, written into it. */
static void set_ipv4_checksum(uint8_t *ip) {
    ip[10] = ip[11] = 0;
    uint32_t sum = 0;
    for (int i = 0; i < IPV4_BYTES; i += 2) sum += rd16(ip + i);
    while (sum >> 16) sum = (sum & 0xFFFF) + (sum >> 16);
    wr16(ip + 10, (uint16_t)~sum);
}

/* SwitchReduceDeparser.frame for an answer: the frame addressed back to where it came from
 * (MACs, IPv4 addresses, UDP ports swapped), a zero UDP checksum, the IPv4 checksum anew. */
static void address_back(uint8_t *f) {
    swap_bytes(f, f + 6, 6);
    swap_bytes(f + IP_AT + 12, f + IP_AT + 16, 4);
    swap_bytes(f + UDP_AT, f + UDP_AT + 2, 2);
    f[UDP_AT + 6] = f[UDP_AT + 7] = 0;
    set_ipv4_checksum(f + IP_AT);
}

/* The packet back to its sender alone (egress port = ingress port, no rewrite). */
static int to_sender(Engine *e, const pkt_t *p) {
    if (p->frame == NULL)
        return emit(e, &(out_t){.data = p->d, .len = p->avail, .ip = p->ip, .udp_port = p->sport});
    address_back(p->frame);
    return emit(e, &(out_t){.data = p->frame, .len = p->wire_len, .port = p->port});
}

/* PacketReplicationEngine then SwitchReduceEgress: one copy per replica of ``group``, each to
 * the worker its rid's result_rewrite entry names, else back where the packet came from. Raw
 * mode: each copy leaves by its replica's port, a rewritten one with a header of its own. */
static int to_group(Engine *e, const pkt_t *p, uint16_t group) {
    const group_t *g = e->groups[group];
    if (g == NULL) return 0;
    if (p->frame != NULL) address_back(p->frame);
    for (size_t i = 0; i < g->count; i++) {
        uint32_t rid = g->replicas[i].rid;
        const rewrite_t *r = rid != 0 && rid < KEYS16 && e->rewrite[rid].rewrites ? &e->rewrite[rid] : NULL;
        out_t o;
        if (p->frame == NULL) {
            o = (out_t){.data = p->d, .len = p->avail, .ip = r ? r->ip : p->ip,
                        .udp_port = r ? r->udp_port : p->sport};
        } else {
            o = (out_t){.data = p->frame, .len = p->wire_len, .port = (uint16_t)g->replicas[i].port};
            if (r != NULL) {
                o.own_head = 1;
                memcpy(o.head, p->frame, L2_L4_BYTES);
                wr48(o.head, r->mac);
                wr32(o.head + IP_AT + 16, r->ip);
                wr16(o.head + UDP_AT + 2, r->udp_port);
                set_ipv4_checksum(o.head + IP_AT);
            }
        }
        if (emit(e, &o) < 0) return -1;
    }
    return 0;
}

/* Turn the packet into the row's result (header kept, but its type, the max exponent and, in
 * length, the bitmap); the sums follow, unless the packet is a header alone. */
static void make_result(const Engine *e, uint8_t *d, uint32_t row, int alone) {
    const int32_t *v = e->value + (size_t)row * e->k;
    uint8_t *p = d + HEADER_BYTES;
    d[0] = MSG_RESULT;
    d[6] = e->exponent[row];
    wr32(d + 16, e->bitmap[row]); /* length: the ranks in the sums */
    for (uint32_t i = 0; !alone && i < e->k; i++) {
        uint32_t be = __builtin_bswap32((uint32_t)v[i]);
        memcpy(p + 4 * i, &be, 4);
    }
}

#define PUNT 1

/* One aggregation packet through SwitchReduceIngress; what it emits is appended to e->outs,
 * its bytes rewritten in place. Returns 0, PUNT for a static job's JOIN (the CPU answers it),
 * or -1 out of memory. */
static int aggregate(Engine *e, pkt_t *p) {
    uint8_t *d = p->d;
    uint32_t len = p->wire_len;
    if (p->avail >= HEADER_BYTES && d[0] == MSG_JOIN && (e->punt[rd16(d + 2) >> 3] >> (rd16(d + 2) & 7) & 1))
        return PUNT;
    /* A header alone (UDP length says so) is a RELEASE, or a contribution without elements (a
     * priming use, count 0); anything else carries K elements and is no RELEASE. */
    int alone = p->udp_length == UDP_BYTES + HEADER_BYTES;
    int well_formed =
        p->avail >= HEADER_BYTES &&
        (alone ? d[0] == MSG_RELEASE || rd16(d + 10) == 0
               : p->avail >= e->datagram && p->udp_length == UDP_BYTES + e->datagram &&
                     d[0] != MSG_RELEASE);
    if (!well_formed || (d[0] != MSG_DATA && d[0] != MSG_RESEND && d[0] != MSG_RELEASE) ||
        rd16(d + 10) > e->k) {
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
    if (hash_find(&e->workers, worker_key(job_id, rank, p->port, p->ip, p->sport)) < 0) {
        count(e, C_DROPS, DROP_UNBOUND_WORKER, len);
        return 0;
    }
    uint64_t session = rd64(d + 20);
    if (session != job->session) { /* another run's packet, or a guess: tell the sender */
        count(e, C_DROPS, DROP_BAD_SESSION, len);
        if (d[0] == MSG_RELEASE) return 0; /* nothing answers a RELEASE */
        d[0] = MSG_STALE;
        return to_sender(e, p);
    }
    uint32_t row = 2 * index + version;
    uint16_t hround = rd16(d + 8);
    uint8_t hexp = d[6], hformat = d[7];
    uint32_t hchunk = rd32(d + 12), hlength = rd32(d + 16);
    if (e->slot_session[index] != session) { /* the session's first use of the slot */
        e->slot_session[index] = session;
        e->round[2 * index] = e->round[2 * index + 1] = (uint16_t)(hround - 1);
        e->seen[2 * index] = e->seen[2 * index + 1] = 0xFFFFFFFF;
    }
    uint16_t ahead = (uint16_t)(hround - e->round[row]); /* serial-number order */
    uint32_t bit = rank < 32 ? (uint32_t)1 << rank : 0;  /* bit<32>: higher ranks have none */
    if (ahead >= 0x8000) {
        count(e, C_DROPS, DROP_STALE, len);
        return 0;
    }
    /* A new round overwrites the row's round before last: only once every rank has its sums, so
     * a rank late for a quorum can still ask for them (pipeline.py). */
    if (e->round[row ^ 1] == (uint16_t)(hround - 1)) e->seen[row ^ 1] |= bit;
    if (d[0] == MSG_RELEASE) { /* its rank has the sums of the round */
        if (ahead == 0) e->seen[row] |= bit;
        return 0;
    }
    /* bit<32>: 32 ranks or more make all ones */
    uint32_t everyone = (uint32_t)((job->world_size < 32 ? 1ull << job->world_size : 0) - 1);
    if (ahead != 0) e->seen[row] |= bit; /* its rank has the row's older round */
    if (ahead != 0 && job->quorum != job->world_size && (e->seen[row] & everyone) != everyone) {
        count(e, C_DROPS, DROP_AHEAD, len); /* a rank lacks the row's sums */
        return 0;
    }
    if (ahead == 0 && e->arrivals[row] == ROW_REFUSED) { /* the round was refused */
        count(e, C_DROPS, DROP_MISMATCH, len);
        d[0] = MSG_REFUSED;
        return to_sender(e, p);
    }
    if (ahead == 0 && (e->bitmap[row] & bit)) {
        if (e->arrivals[row] != 0) { /* in, but the round waits for others: not lost, say so */
            count(e, C_DROPS, DROP_DUPLICATE, len);
            d[0] = MSG_WAITING;
            wr32(d + 16, e->bitmap[row]); /* length: the ranks in the row */
            return to_sender(e, p);
        }
        make_result(e, d, row, alone); /* complete: the worker lost the result */
        count(e, C_RETRANSMIT_REPLIES, job_id, len);
        return to_sender(e, p);
    }
    if (ahead == 0 && (e->row_format[row] != hformat || e->row_length[row] != hlength ||
                       e->row_chunk[row] != hchunk)) {
        e->arrivals[row] = ROW_REFUSED; /* ranks disagree: no rank may take this round's sums */
        count(e, C_DROPS, DROP_MISMATCH, len);
        d[0] = MSG_REFUSED;
        return to_group(e, p, job->mcast_grp);
    }
    if (ahead == 0 && e->arrivals[row] == 0) { /* late: a quorum completed the round without it */
        count(e, C_DROPS, DROP_LATE, len);        /* its contribution is not added */
        if (d[0] != MSG_RESEND) return 0;         /* the result's multicast went to it too */
        make_result(e, d, row, alone); /* it may have lost that: the sums, to it alone */
        return to_sender(e, p);
    }
    int32_t *v = e->value + (size_t)row * e->k;
    const uint8_t *elements = d + HEADER_BYTES;
    uint32_t arrived;
    if (ahead) { /* the first packet of a new round writes */
        e->round[row] = hround;
        e->bitmap[row] = bit;
        e->seen[row] = 0; /* nobody has its sums yet */
        arrived = 0;
        for (uint32_t i = 0; !alone && i < e->k; i++) v[i] = (int32_t)rd32(elements + 4 * i);
        e->exponent[row] = hexp;
        e->row_format[row] = hformat;
        e->row_length[row] = hlength;
        e->row_chunk[row] = hchunk;
    } else { /* later ones add, wrapping modulo 2**32 as bit<32> does */
        e->bitmap[row] |= bit;
        arrived = e->arrivals[row];
        for (uint32_t i = 0; !alone && i < e->k; i++) v[i] = (int32_t)((uint32_t)v[i] + rd32(elements + 4 * i));
        if (hexp > e->exponent[row]) e->exponent[row] = hexp;
    }
    arrived = (arrived + 1) & 0xFF; /* bit<8> */
    if (arrived == job->quorum) arrived = 0;
    e->arrivals[row] = (uint8_t)arrived;
    count(e, C_AGGREGATED, job_id, len);
    if (arrived != 0) return 0; /* consumed: its contribution is in the registers */
    make_result(e, d, row, alone);
    count(e, C_RESULTS, job_id, len);
    return to_group(e, p, job->mcast_grp);
}

/* UDP mode: a datagram from (ip, port), on ingress port 0. */
static int process_datagram(Engine *e, uint8_t *d, uint32_t len, uint32_t ip, uint16_t sport) {
    pkt_t p = {NULL, d, len, UDP_BYTES + len, len, ip, sport, 0};
    return aggregate(e, &p);
}

/* Raw mode: SwitchReduceParser.parse_frame, then the pipeline; traffic other than UDP to the
 * aggregation port range is forwarded by destination MAC (a frame too short for Ethernet as if
 * to MAC 0, as the parser leaves it). */
static int process_frame(Engine *e, uint8_t *f, uint32_t len, uint16_t port) {
    uint64_t dst = len >= ETH_BYTES ? rd48(f) : 0;
    if (len >= L2_L4_BYTES && rd16(f + 12) == ETHERTYPE_IPV4 && f[IP_AT] == 0x45 &&
        f[IP_AT + 9] == IP_PROTO_UDP && (rd16(f + UDP_AT + 2) & 0xFFF0) == UDP_PORT_MIN) {
        pkt_t p = {f, f + L2_L4_BYTES, len - L2_L4_BYTES, rd16(f + UDP_AT + 4), len,
                   rd32(f + IP_AT + 12), rd16(f + UDP_AT), port};
        return aggregate(e, &p);
    }
    long hit = hash_find(&e->forward, mac_key(dst));
    if (hit < 0) {
        count(e, C_DROPS, DROP_NO_ROUTE, len);
        return 0;
    }
    return emit(e, &(out_t){.data = f, .len = len, .port = e->forward.values[hit]});
}

/* A received packet (UDP mode: a datagram; raw mode: a frame) through the pipeline. */
static int process(Engine *e, const out_t *in) {
    e->nouts = 0;
    return e->raw ? process_frame(e, in->data, in->len, in->port)
                  : process_datagram(e, in->data, in->len, in->ip, in->udp_port);
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

/* -- sending -------------------------------------------------------------------------------- */

/* A send that found no room (a full buffer or queue: a congested port), or no link (its peer
 * went away): the packet is lost, as on a real port. Raw mode: a frame larger than the port's
 * MTU too. */
static int is_overrun(const Engine *e, int err) {
    return err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS || err == ENETDOWN ||
           err == ENXIO || err == ENODEV || (e->raw && err == EMSGSIZE);
}

/* sendmmsg the first ``count`` messages of e->tx; one the socket has no room for is lost,
 * counted per datagram. Returns the index of a GSO message the kernel refused (nothing from it
 * on is sent), or ``count``. */
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
            if (is_overrun(e, errno))
                e->tx_overruns += e->tx_count[i];
            else if (!e->error)
                e->error = errno;
            i++;
        }
    }
    return count;
}

/* UDP mode: send what is queued, each destination's datagrams of one size together, in order. */
static void send_datagrams(Engine *e) {
    size_t nmsg = 0;
    for (size_t i = 0; i < e->ntx; i++) { /* which message: the destination's latest, if it fits */
        const out_t *o = &e->txq[i];
        size_t m = nmsg;
        for (size_t j = nmsg; !e->gso_off && j-- > 0 && nmsg - j <= 16;) {
            const out_t *head = &e->txq[e->tx_first[j]];
            if (head->ip == o->ip && head->udp_port == o->udp_port) {
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
        to->sin_port = htons(head->udp_port);
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
    size_t refused = send_messages(e, e->udp_fd, nmsg);
    if (refused < nmsg) {
        /* GSO refused: from now on a datagram a message; the unsent ones again */
        e->gso_off = 1;
        for (size_t m = refused; m < nmsg; m++) {
            struct msghdr *h = &e->tx[m].msg_hdr;
            const struct sockaddr_in *to = h->msg_name;
            for (size_t v = 0; v < h->msg_iovlen; v++)
                e->txq[e->ntx++] = (out_t){.data = h->msg_iov[v].iov_base,
                                           .len = (uint32_t)h->msg_iov[v].iov_len,
                                           .ip = ntohl(to->sin_addr.s_addr),
                                           .udp_port = ntohs(to->sin_port)};
        }
        send_datagrams(e);
    }
}

/* Raw mode: send what is queued, one sendmmsg a port with its frames in order. A frame for a
 * port the switch does not serve, or whose link is gone, is lost. */
static void send_frames(Engine *e) {
    uint8_t done[TX_QUEUE] = {0};
    for (size_t first = 0; first < e->ntx; first++) {
        if (done[first]) continue;
        uint16_t number = e->txq[first].port;
        int index = e->port_index[number];
        size_t n = 0;
        for (size_t i = first; i < e->ntx; i++) {
            const out_t *o = &e->txq[i];
            if (done[i] || o->port != number) continue;
            done[i] = 1;
            struct iovec *iov = &e->txiov[2 * n];
            if (o->own_head) {
                iov[0] = (struct iovec){(void *)o->head, L2_L4_BYTES};
                iov[1] = (struct iovec){o->data + L2_L4_BYTES, o->len - L2_L4_BYTES};
            } else {
                iov[0] = (struct iovec){o->data, o->len};
            }
            e->tx[n].msg_hdr = (struct msghdr){.msg_iov = iov, .msg_iovlen = o->own_head ? 2 : 1};
            e->tx_count[n++] = 1;
        }
        if (index < 0 || e->ports[index].down)
            e->tx_overruns += n;
        else
            send_messages(e, e->ports[index].fd, n);
    }
    e->ntx = 0;
}

static void send_queued(Engine *e) {
    if (e->raw)
        send_frames(e);
    else
        send_datagrams(e);
}

/* Send what is queued, then free the heap bytes it pointed into. */
static void flush_tx(Engine *e) {
    send_queued(e);
    owned_clear(&e->scratch);
}

static void queue_tx(Engine *e, const out_t *o) {
    if (e->ntx == TX_QUEUE) send_queued(e); /* scratch stays: later packets point into it */
    out_t *slot = &e->txq[e->ntx++];
    memcpy(slot, o, o->own_head ? sizeof(out_t) : offsetof(out_t, head));
}

/* An emitted packet through the egress fault injector into the send queue. */
static int egress(Engine *e, const out_t *o) {
    int f = fate(&e->egress);
    for (int c = 0; c < (f & 3); c++) {
        if (f & HOLD) {
            if (owned_push(&e->egress.held, o) < 0) return -1;
        } else {
            queue_tx(e, o);
        }
    }
    if (f && !(f & HOLD) && e->egress.held.count) { /* held ones arrive after a later one */
        size_t first = e->scratch.count;
        if (owned_move(&e->scratch, &e->egress.held) < 0) return -1;
        for (size_t i = first; i < e->scratch.count; i++) queue_tx(e, &e->scratch.items[i]);
    }
    return 0;
}

/* -- receiving ------------------------------------------------------------------------------ */

/* A received packet through the pipeline, its output through egress; a punt is kept. */
static int ingress_one(Engine *e, const out_t *in) {
    int verdict = process(e, in);
    if (verdict < 0) return -1;
    if (verdict == PUNT) return owned_push(&e->punted, in);
    for (size_t i = 0; i < e->nouts; i++)
        if (egress(e, &e->outs[i]) < 0) return -1;
    return 0;
}

/* Process the packets ``list`` holds, in order; their bytes then belong to the scratch list. */
static int ingress_owned(Engine *e, owned_t *list) {
    size_t first = e->scratch.count;
    if (owned_move(&e->scratch, list) < 0) return -1;
    size_t last = e->scratch.count;
    for (size_t i = first; i < last; i++) {
        out_t item = e->scratch.items[i]; /* by value: processing may grow the scratch list */
        if (ingress_one(e, &item) < 0) return -1;
    }
    return 0;
}

/* A received packet through the ingress fault injector, then the pipeline. */
static int ingress(Engine *e, const out_t *in) {
    int f = fate(&e->ingress);
    if (f == 0) return 0;
    if (f & HOLD) {
        for (int c = 0; c < (f & 3); c++)
            if (owned_push(&e->ingress.held, in) < 0) return -1;
        return 0;
    }
    owned_t dup = {0};
    if (f == 2 && owned_push(&dup, in) < 0) return -1; /* before the bytes are rewritten */
    if (ingress_one(e, in) < 0 || ingress_owned(e, &dup) < 0) {
        owned_free(&dup);
        return -1;
    }
    free(dup.items);
    return e->ingress.held.count ? ingress_owned(e, &e->ingress.held) : 0;
}

/* Silence on the link: held packets go on (the ingress ones through the pipeline). */
static int release_held(Engine *e) {
    if (ingress_owned(e, &e->ingress.held) < 0) return -1;
    size_t first = e->scratch.count;
    if (owned_move(&e->scratch, &e->egress.held) < 0) return -1;
    for (size_t i = first; i < e->scratch.count; i++) queue_tx(e, &e->scratch.items[i]);
    return 0;
}

/* Nothing to read: sleep briefly so one wake-up drains a batch (as NIC interrupt coalescing
 * does), then wait for the sockets at most IDLE_MS. Returns 1 if something came; 0 after
 * silence (held packets then go on), a signal or a failure (in e->error): time for Python. */
static int idle(Engine *e, struct pollfd *fds, nfds_t nfds) {
    struct timespec nap = {0, COALESCE_NS};
    if (nanosleep(&nap, NULL) < 0) return 0; /* a signal */
    int ready = poll(fds, nfds, IDLE_MS);
    if (ready > 0) return 1;
    if (ready < 0) {
        if (errno != EINTR && !e->error) e->error = errno;
        return 0;
    }
    pthread_mutex_lock(&e->lock);
    if (release_held(e) < 0 && !e->error) e->error = ENOMEM;
    flush_tx(e);
    pthread_mutex_unlock(&e->lock);
    return 0;
}

static double monotonic(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* UDP mode: serve ``udp_fd`` until ``budget`` seconds have passed, the link has been idle
 * IDLE_MS, a packet waits for the CPU, or a signal arrives: then Python checks for a stop and
 * answers punts. Returns 0 or an errno. Runs without the GIL. */
static int serve_loop(Engine *e, double budget) {
    double deadline = monotonic() + budget;
    uint32_t room = e->datagram + 1; /* a spare byte exposes an oversized datagram */
    for (int i = 0; i < BATCH; i++) {
        e->rxiov[i] = (struct iovec){e->rxbuf + (size_t)i * room, room};
        e->rx[i].msg_hdr = (struct msghdr){.msg_name = &e->rxaddr[i].in,
                                           .msg_iov = &e->rxiov[i], .msg_iovlen = 1};
    }
    struct pollfd p = {e->udp_fd, POLLIN, 0};
    for (;;) {
        for (int i = 0; i < BATCH; i++) e->rx[i].msg_hdr.msg_namelen = sizeof(e->rxaddr[i].in);
        int n = recvmmsg(e->udp_fd, e->rx, BATCH, MSG_DONTWAIT, NULL);
        if (n > 0) {
            int failed = 0;
            pthread_mutex_lock(&e->lock);
            e->received += (unsigned)n;
            for (int i = 0; i < n && !failed; i++) {
                const struct sockaddr_in *from = &e->rxaddr[i].in;
                out_t in = {.data = e->rxbuf + (size_t)i * room, .len = e->rx[i].msg_len,
                            .ip = ntohl(from->sin_addr.s_addr), .udp_port = ntohs(from->sin_port)};
                failed = ingress(e, &in) < 0;
            }
            flush_tx(e);
            pthread_mutex_unlock(&e->lock);
            if (failed) return ENOMEM;
            if (e->error) return e->error;
            if (e->punted.count || monotonic() >= deadline) return 0;
            continue;
        }
        if (n < 0 && errno == EINTR) return 0;
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return errno;
        if (!idle(e, &p, 1) || monotonic() >= deadline) return e->error;
    }
}

/* Raw mode: read up to BATCH frames from port ``index`` into its buffers; returns how many, 0
 * when it has none (or its link just went away), or -errno. */
static int receive_frames(Engine *e, size_t index) {
    port_t *port = &e->ports[index];
    for (int i = 0; i < BATCH; i++) {
        e->rxiov[i] = (struct iovec){port->rxbuf + (size_t)i * e->frame_room, e->frame_room};
        e->rx[i].msg_hdr = (struct msghdr){.msg_name = &e->rxaddr[i].ll,
                                           .msg_namelen = sizeof(e->rxaddr[i].ll),
                                           .msg_iov = &e->rxiov[i], .msg_iovlen = 1};
    }
    int n = recvmmsg(port->fd, e->rx, BATCH, MSG_DONTWAIT, NULL);
    if (n >= 0) return n;
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
    if (errno == ENETDOWN || errno == ENXIO || errno == ENODEV) { /* its peer was deleted */
        port->down = 1;
        return 0;
    }
    return -errno;
}

/* Raw mode: serve every port as serve_loop serves the UDP socket. Each sweep reads every port
 * (each into its own buffers, which the frames sent point into), then sends what they made. */
static int serve_frames_loop(Engine *e, double budget) {
    double deadline = monotonic() + budget;
    struct pollfd fds[PORTS];
    for (;;) {
        int got = 0;
        for (size_t s = 0; s < e->nports; s++) {
            if (e->ports[s].down) continue;
            int n = receive_frames(e, s);
            if (n < 0) return -n;
            if (n == 0) continue;
            got = 1;
            int failed = 0;
            pthread_mutex_lock(&e->lock);
            for (int i = 0; i < n && !failed; i++) {
                const struct mmsghdr *m = &e->rx[i];
                if (e->rxaddr[i].ll.sll_pkttype == PACKET_OUTGOING) continue; /* our own */
                e->received++;
                if (m->msg_hdr.msg_flags & MSG_TRUNC) { /* longer than any port's MTU */
                    e->truncated++;
                    continue;
                }
                out_t in = {.data = e->rxiov[i].iov_base, .len = m->msg_len,
                            .port = e->ports[s].number};
                failed = ingress(e, &in) < 0;
            }
            pthread_mutex_unlock(&e->lock);
            if (failed) return ENOMEM;
        }
        if (got) {
            pthread_mutex_lock(&e->lock);
            flush_tx(e);
            pthread_mutex_unlock(&e->lock);
            if (e->error) return e->error;
            if (e->punted.count || monotonic() >= deadline) return 0;
            continue;
        }
        nfds_t nfds = 0;
        for (size_t s = 0; s < e->nports; s++)
            if (!e->ports[s].down) fds[nfds++] = (struct pollfd){e->ports[s].fd, POLLIN, 0};
        if (!idle(e, fds, nfds) || monotonic() >= deadline) return e->error;
    }
}

/* -- the Python type ------------------------------------------------------------------------ */

static const char *const REGISTER_NAMES[NUM_REGISTERS] = {
    "slot_session", "round", "bitmap", "arrivals", "exponent", "row_format", "row_length",
    "row_chunk", "seen", "value",
};
static const char *const REGISTER_TYPES[NUM_REGISTERS] = {"u8", "u2", "u4", "u1", "u1", "u1",
                                                          "u4", "u4", "u4", "i4"};
static const size_t REGISTER_WIDTHS[NUM_REGISTERS] = {8, 2, 4, 1, 1, 1, 4, 4, 4, 4};

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
    hash_free(&self->workers);
    hash_free(&self->forward);
    free(self->outs);
    free(self->rxbuf);
    for (size_t p = 0; p < self->nports; p++) free(self->ports[p].rxbuf);
    free(self->ports);
    owned_free(&self->scratch);
    owned_free(&self->punted);
    owned_free(&self->ingress.held);
    owned_free(&self->egress.held);
    pthread_mutex_destroy(&self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Engine_init(Engine *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"k", "pool_size", "max_jobs", "workers_size", "forward_size", NULL};
    unsigned int k, pool, max_jobs, workers_size, forward_size;
    if (self->arena != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "an engine is initialized once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "IIIII", kwlist, &k, &pool, &max_jobs,
                                     &workers_size, &forward_size))
        return -1;
    pthread_mutex_init(&self->lock, NULL); /* before anything dealloc may meet */
    if (k == 0 || k > 4096 || pool == 0 || pool > (1u << 15) || max_jobs == 0 || max_jobs > KEYS16 ||
        workers_size == 0 || workers_size > (1u << 24) || forward_size == 0 ||
        forward_size > (1u << 24)) {
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
    int tables = hash_init(&self->workers, workers_size) | hash_init(&self->forward, forward_size);
    self->rxbuf = malloc((size_t)BATCH * (self->datagram + 1));
    for (size_t p = 0; p < PORTS; p++) self->port_index[p] = -1;
    if (!self->arena || !self->jobs || !self->rewrite || !self->groups || tables < 0 ||
        !self->rxbuf) {
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
    self->seen = (uint32_t *)(a + self->offsets[R_SEEN]);
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

static const int JOBS_KEY[] = {16}, JOBS_ARGS[] = {8, 8, 16, 16, 16, 64};
static const int WORKERS_KEY[] = {16, 8, 9, 32, 16};
static const int REWRITE_KEY[] = {16}, REWRITE_ARGS[] = {48, 32, 16};
static const int FORWARD_KEY[] = {48}, FORWARD_ARGS[] = {9};

static PyObject *Engine_write_entry(Engine *self, PyObject *args) {
    int table;
    PyObject *key, *params;
    if (!PyArg_ParseTuple(args, "iO!O", &table, &PyTuple_Type, &key, &params)) return NULL;
    int noaction = params == Py_None;
    uint64_t k[5], a[6] = {0};
    switch (table) {
    case T_JOBS:
        if (unpack_ints(key, JOBS_KEY, 1, k, "jobs key") < 0 ||
            (!noaction && unpack_ints(params, JOBS_ARGS, 6, a, "set_job") < 0))
            return NULL;
        pthread_mutex_lock(&self->lock);
        /* NoAction sets no metadata: P4 leaves it zero */
        self->jobs[k[0]] = (job_t){1,           (uint8_t)a[0],  (uint8_t)a[1], (uint16_t)a[2],
                                   (uint16_t)a[3], (uint16_t)a[4], a[5]};
        pthread_mutex_unlock(&self->lock);
        break;
    case T_WORKERS:
    case T_FORWARD: {
        int workers = table == T_WORKERS;
        if (workers ? unpack_ints(key, WORKERS_KEY, 5, k, "workers key") < 0
                    : unpack_ints(key, FORWARD_KEY, 1, k, "forward key") < 0 ||
                          (!noaction && unpack_ints(params, FORWARD_ARGS, 1, a, "set_egress_port") < 0))
            return NULL;
        /* workers: a hit admits, whichever action the entry has; forward: NoAction sets no
         * port, so the frame leaves by port 0 (egress_spec as P4 leaves it) */
        pthread_mutex_lock(&self->lock);
        int full = workers ? hash_put(&self->workers, worker_key((uint16_t)k[0], (uint8_t)k[1],
                                                                 (uint32_t)k[2], (uint32_t)k[3],
                                                                 (uint16_t)k[4]), 0) < 0
                           : hash_put(&self->forward, mac_key(k[0]), (uint16_t)a[0]) < 0;
        pthread_mutex_unlock(&self->lock);
        if (full) {
            PyErr_SetString(PyExc_ValueError, "the engine's table is full");
            return NULL;
        }
        break;
    }
    case T_RESULT_REWRITE:
        if (unpack_ints(key, REWRITE_KEY, 1, k, "result_rewrite key") < 0 ||
            (!noaction && unpack_ints(params, REWRITE_ARGS, 3, a, "rewrite_destination") < 0))
            return NULL;
        pthread_mutex_lock(&self->lock);
        self->rewrite[k[0]] = (rewrite_t){1, (uint8_t)!noaction, (uint16_t)a[2], (uint32_t)a[1], a[0]};
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
    static const int *const widths[NUM_TABLES] = {JOBS_KEY, WORKERS_KEY, REWRITE_KEY, FORWARD_KEY};
    if (table < 0 || table >= NUM_TABLES) {
        PyErr_Format(PyExc_ValueError, "no table %d", table);
        return NULL;
    }
    if (unpack_ints(key, widths[table], table == T_WORKERS ? 5 : 1, k, "key") < 0) return NULL;
    pthread_mutex_lock(&self->lock);
    if (table == T_JOBS)
        self->jobs[k[0]].present = 0;
    else if (table == T_RESULT_REWRITE)
        self->rewrite[k[0]] = (rewrite_t){0};
    else if (table == T_FORWARD)
        hash_delete(&self->forward, mac_key(k[0]));
    else
        hash_delete(&self->workers, worker_key((uint16_t)k[0], (uint8_t)k[1], (uint32_t)k[2],
                                               (uint32_t)k[3], (uint16_t)k[4]));
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
        hash_clear(table == T_FORWARD ? &self->forward : &self->workers);
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

/* A copy of the bytes ``data`` holds (the pipeline rewrites them in place). */
static uint8_t *copy_buffer(Py_buffer *data) {
    uint8_t *copy = malloc(data->len ? (size_t)data->len : 1);
    if (copy != NULL) memcpy(copy, data->buf, (size_t)data->len);
    PyBuffer_Release(data);
    return copy;
}

/* What one packet made the pipeline emit, as Python objects: None for a punt, else a list of
 * (IPv4 address, UDP port, datagram) in UDP mode or (port, frame) in raw mode. */
static PyObject *emitted(Engine *self, int verdict, int frames) {
    if (verdict < 0) return PyErr_NoMemory();
    if (verdict == PUNT) return Py_NewRef(Py_None);
    PyObject *out = PyList_New((Py_ssize_t)self->nouts);
    for (size_t i = 0; out != NULL && i < self->nouts; i++) {
        const out_t *o = &self->outs[i];
        PyObject *item;
        if (!frames) {
            item = Py_BuildValue("(IHy#)", o->ip, o->udp_port, o->data, (Py_ssize_t)o->len);
        } else {
            PyObject *bytes = PyBytes_FromStringAndSize((const char *)o->data, (Py_ssize_t)o->len);
            if (bytes != NULL && o->own_head) memcpy(PyBytes_AS_STRING(bytes), o->head, L2_L4_BYTES);
            item = bytes == NULL ? NULL : Py_BuildValue("(HN)", o->port, bytes);
        }
        if (item == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, item);
    }
    return out;
}

static PyObject *Engine_process(Engine *self, PyObject *args) {
    Py_buffer data;
    unsigned int ip;
    unsigned short port;
    if (!PyArg_ParseTuple(args, "y*IH", &data, &ip, &port)) return NULL;
    uint32_t len = (uint32_t)data.len;
    uint8_t *copy = copy_buffer(&data);
    if (copy == NULL) return PyErr_NoMemory();
    pthread_mutex_lock(&self->lock);
    self->nouts = 0;
    PyObject *out = emitted(self, process_datagram(self, copy, len, ip, port), 0);
    pthread_mutex_unlock(&self->lock);
    free(copy);
    return out;
}

static PyObject *Engine_process_frame(Engine *self, PyObject *args) {
    Py_buffer data;
    unsigned short port;
    if (!PyArg_ParseTuple(args, "y*H", &data, &port)) return NULL;
    uint32_t len = (uint32_t)data.len;
    uint8_t *copy = copy_buffer(&data);
    if (copy == NULL) return PyErr_NoMemory();
    pthread_mutex_lock(&self->lock);
    self->nouts = 0;
    PyObject *out = emitted(self, process_frame(self, copy, len, port), 1);
    pthread_mutex_unlock(&self->lock);
    free(copy);
    return out;
}

/* Serve with the GIL released: UDP mode's socket or raw mode's ports. */
static PyObject *serve(Engine *self, int raw, double budget) {
    if (self->serving) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is already serving");
        return NULL;
    }
    if (raw != self->raw) {
        PyErr_SetString(PyExc_RuntimeError, raw ? "serve_frames needs set_ports first"
                                                : "the engine serves frames (set_ports)");
        return NULL;
    }
    self->serving = 1;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = raw ? serve_frames_loop(self, budget) : serve_loop(self, budget);
    Py_END_ALLOW_THREADS
    self->serving = 0;
    self->error = 0;
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSize_t(self->punted.count);
}

static PyObject *Engine_serve(Engine *self, PyObject *args) {
    int fd;
    double budget;
    if (!PyArg_ParseTuple(args, "id", &fd, &budget)) return NULL;
    self->udp_fd = fd;
    return serve(self, 0, budget);
}

static PyObject *Engine_serve_frames(Engine *self, PyObject *args) {
    double budget;
    if (!PyArg_ParseTuple(args, "d", &budget)) return NULL;
    return serve(self, 1, budget);
}

static PyObject *Engine_set_ports(Engine *self, PyObject *args) {
    PyObject *ports;
    unsigned int frame_bytes;
    if (!PyArg_ParseTuple(args, "OI", &ports, &frame_bytes)) return NULL;
    if (self->raw || self->serving) {
        PyErr_SetString(PyExc_RuntimeError, "an engine's ports are set once");
        return NULL;
    }
    if (frame_bytes < L2_L4_BYTES || frame_bytes > (1u << 20)) {
        PyErr_SetString(PyExc_ValueError, "frame_bytes out of range");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(ports, "ports must be a sequence of (port, fd)");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n == 0 || n > PORTS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "one to 512 ports");
        return NULL;
    }
    self->ports = calloc((size_t)n, sizeof(port_t));
    if (self->ports == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    self->frame_room = (frame_bytes + 63) & ~63u;
    static const int widths[] = {9, 31};
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t pf[2];
        if (unpack_ints(PySequence_Fast_GET_ITEM(seq, i), widths, 2, pf, "port") < 0) break;
        if (self->port_index[pf[0]] >= 0) {
            PyErr_Format(PyExc_ValueError, "port %d given twice", (int)pf[0]);
            break;
        }
        port_t *port = &self->ports[self->nports++];
        *port = (port_t){(int)pf[1], (uint16_t)pf[0], 0, malloc((size_t)BATCH * self->frame_room)};
        self->port_index[pf[0]] = (int16_t)i;
        if (port->rxbuf == NULL) {
            PyErr_NoMemory();
            break;
        }
    }
    Py_DECREF(seq);
    if (PyErr_Occurred()) {
        for (size_t p = 0; p < self->nports; p++) {
            self->port_index[self->ports[p].number] = -1;
            free(self->ports[p].rxbuf);
        }
        free(self->ports);
        self->ports = NULL;
        self->nports = 0;
        return NULL;
    }
    self->raw = 1;
    Py_RETURN_NONE;
}

static PyObject *Engine_take_punted(Engine *self, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&self->lock);
    PyObject *out = PyList_New((Py_ssize_t)self->punted.count);
    for (size_t i = 0; out != NULL && i < self->punted.count; i++) {
        const out_t *o = &self->punted.items[i];
        PyObject *item = Py_BuildValue("(y#IHH)", o->data, (Py_ssize_t)o->len, o->ip, o->udp_port,
                                       o->port);
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

/* One packet from the CPU through the egress fault injector and out, between serving calls
 * (the send queue and its scratch bytes are the serving loop's while it runs). */
static PyObject *transmit(Engine *self, Py_buffer *data, const out_t *o) {
    if (self->serving) {
        PyBuffer_Release(data);
        PyErr_SetString(PyExc_RuntimeError, "transmit between serve calls, not during one");
        return NULL;
    }
    pthread_mutex_lock(&self->lock);
    int failed = egress(self, o) < 0;
    flush_tx(self);
    int err = self->error;
    self->error = 0;
    pthread_mutex_unlock(&self->lock);
    PyBuffer_Release(data);
    if (failed) return PyErr_NoMemory();
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_transmit(Engine *self, PyObject *args) {
    int fd;
    unsigned int ip;
    unsigned short port;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "iIHy*", &fd, &ip, &port, &data)) return NULL;
    if (self->raw) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_RuntimeError, "the engine serves frames: transmit_frame");
        return NULL;
    }
    self->udp_fd = fd;
    return transmit(self, &data,
                    &(out_t){.data = data.buf, .len = (uint32_t)data.len, .ip = ip, .udp_port = port});
}

static PyObject *Engine_transmit_frame(Engine *self, PyObject *args) {
    unsigned short port;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "Hy*", &port, &data)) return NULL;
    if (!self->raw) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_RuntimeError, "transmit_frame needs set_ports first");
        return NULL;
    }
    return transmit(self, &data, &(out_t){.data = data.buf, .len = (uint32_t)data.len, .port = port});
}

static PyObject *fault_stats(const faults_t *f) {
    return Py_BuildValue("{sKsKsK}", "dropped", f->dropped, "duplicated", f->duplicated,
                         "reordered", f->reordered);
}

static PyObject *Engine_stats(Engine *self, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&self->lock);
    PyObject *down = PyList_New(0);
    for (size_t p = 0; down != NULL && p < self->nports; p++) {
        if (!self->ports[p].down) continue;
        PyObject *number = PyLong_FromLong(self->ports[p].number);
        if (number == NULL || PyList_Append(down, number) < 0) Py_CLEAR(down);
        Py_XDECREF(number);
    }
    PyObject *out = down == NULL ? NULL
                                 : Py_BuildValue("{sKsKsKsKsNsNsN}", "received", self->received,
                                                 "sent", self->sent, "tx_overruns",
                                                 self->tx_overruns, "truncated", self->truncated,
                                                 "ingress", fault_stats(&self->ingress), "egress",
                                                 fault_stats(&self->egress), "ports_down", down);
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
    {"process_frame", (PyCFunction)Engine_process_frame, METH_VARARGS, NULL},
    {"serve", (PyCFunction)Engine_serve, METH_VARARGS, NULL},
    {"set_ports", (PyCFunction)Engine_set_ports, METH_VARARGS, NULL},
    {"serve_frames", (PyCFunction)Engine_serve_frames, METH_VARARGS, NULL},
    {"take_punted", (PyCFunction)Engine_take_punted, METH_NOARGS, NULL},
    {"transmit", (PyCFunction)Engine_transmit, METH_VARARGS, NULL},
    {"transmit_frame", (PyCFunction)Engine_transmit_frame, METH_VARARGS, NULL},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyBufferProcs Engine_as_buffer = {(getbufferproc)Engine_getbuffer, NULL};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "switchreduce.emulation.softswitch._engine.Engine",
    .tp_doc = PyDoc_STR("The soft switch's pipeline and data paths in C (see engine.py)."),
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
        PyModule_AddIntConstant(m, "FORWARD", T_FORWARD) < 0 ||
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
