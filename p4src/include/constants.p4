/* Constants shared with the soft switch (emulation/softswitch/pipeline.py) and
 * switchreduce/wire.py; tests/test_p4src.py checks that both sides agree. */
#ifndef SWITCHREDUCE_CONSTANTS_P4
#define SWITCHREDUCE_CONSTANTS_P4

/* Elements per packet: choose at compile time with -DK=64 ... -DK=1024. */
#ifndef K
#define K 256
#endif

#define POOL_SIZE 4096          /* slots shared by all jobs */
#define ROWS (2 * POOL_SIZE)    /* two shadow copies (versions) per slot */
#define MAX_JOBS 256            /* job ids index the per-job counters */

#define UDP_PORT_MIN 0xBEE0
#define UDP_PORT_MAX 0xBEEF
#define ETHERTYPE_IPV4 0x0800
#define IP_PROTO_UDP 17

#define MSG_DATA 1
#define MSG_RESULT 2
#define MSG_STALE 5
#define MSG_REFUSED 6
#define MSG_WAITING 7
#define MSG_RELEASE 8
#define MSG_RESEND 9
#define SR_HEADER_BYTES 28
#define SR_UDP_LENGTH (8 + SR_HEADER_BYTES + 4 * K)
#define SR_ALONE_UDP_LENGTH (8 + SR_HEADER_BYTES)  /* a header alone: RELEASE, a priming use */

/* Index of the drops counter, one per reason (DropReason in the soft switch). */
#define DROP_BAD_HEADER 0
#define DROP_UNKNOWN_JOB 1
#define DROP_RANK_OUT_OF_RANGE 2
#define DROP_SLOT_OUT_OF_RANGE 3
#define DROP_UNBOUND_WORKER 4
#define DROP_DUPLICATE 5
#define DROP_STALE 6
#define DROP_NO_ROUTE 7
#define DROP_BAD_SESSION 8
#define DROP_MISMATCH 9
#define DROP_LATE 10
#define DROP_AHEAD 11
#define NUM_DROP_REASONS 12

/* The arrivals value of a row whose round was refused (counts stay below 32). */
#define ROW_REFUSED 0xFF

#endif
