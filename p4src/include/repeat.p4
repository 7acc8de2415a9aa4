/* FOR_EACH_ELEMENT(M) expands M(0) M(1) ... M(K-1) for K a power of two from
 * 64 to 1024, so per-element code is written once. Indices are constant
 * expressions such as ((0 + 1) + 2), which the compiler folds. */
#ifndef SWITCHREDUCE_REPEAT_P4
#define SWITCHREDUCE_REPEAT_P4

#define SR_REP1(M, i) M(i)
#define SR_REP2(M, i) SR_REP1(M, i) SR_REP1(M, (i) + 1)
#define SR_REP4(M, i) SR_REP2(M, i) SR_REP2(M, (i) + 2)
#define SR_REP8(M, i) SR_REP4(M, i) SR_REP4(M, (i) + 4)
#define SR_REP16(M, i) SR_REP8(M, i) SR_REP8(M, (i) + 8)
#define SR_REP32(M, i) SR_REP16(M, i) SR_REP16(M, (i) + 16)
#define SR_REP64(M, i) SR_REP32(M, i) SR_REP32(M, (i) + 32)
#define SR_REP128(M, i) SR_REP64(M, i) SR_REP64(M, (i) + 64)
#define SR_REP256(M, i) SR_REP128(M, i) SR_REP128(M, (i) + 128)
#define SR_REP512(M, i) SR_REP256(M, i) SR_REP256(M, (i) + 256)
#define SR_REP1024(M, i) SR_REP512(M, i) SR_REP512(M, (i) + 512)

#define SR_CAT_(a, b) a##b
#define SR_CAT(a, b) SR_CAT_(a, b)
#define FOR_EACH_ELEMENT(M) SR_CAT(SR_REP, K)(M, 0)

#endif
