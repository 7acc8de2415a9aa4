/* SwitchReduce: in-network aggregation of int32 gradient chunks (v1model, BMv2).
 *
 * Workers send K-element chunks into slots; per slot and version the switch
 * keeps a round, a worker bitmap, an arrival count, the max exponent and K
 * sums, and multicasts the result when the last worker's chunk arrives.
 * docs/protocol.md describes the protocol; emulation/softswitch/pipeline.py
 * is the same pipeline in Python.
 *
 * Build: p4c-bm2-ss --arch v1model -DK=256 switchreduce.p4 (make p4).
 */
#include <core.p4>
#include <v1model.p4>

#include "include/constants.p4"
#include "include/repeat.p4"
#include "include/headers.p4"
#include "include/parser.p4"
#include "include/ingress.p4"
#include "include/egress.p4"

V1Switch(
    SwitchReduceParser(),
    SwitchReduceVerifyChecksum(),
    SwitchReduceIngress(),
    SwitchReduceEgress(),
    SwitchReduceComputeChecksum(),
    SwitchReduceDeparser()
) main;
