/* Egress: each multicast copy of a result goes to the worker its replica names. */
#ifndef SWITCHREDUCE_EGRESS_P4
#define SWITCHREDUCE_EGRESS_P4

control SwitchReduceEgress(inout headers_t hdr, inout metadata_t meta,
                           inout standard_metadata_t standard_metadata) {
    @id(8) action rewrite_destination(bit<48> mac, bit<32> ip, bit<16> udp_port) {
        hdr.ethernet.dst_addr = mac;
        hdr.ipv4.dst_addr = ip;
        hdr.udp.dst_port = udp_port;
    }

    @id(4) table result_rewrite {
        key = { standard_metadata.egress_rid: exact; }
        actions = { rewrite_destination; NoAction; }
        default_action = NoAction();
        size = 8192;
    }

    apply {
        if (hdr.sr.isValid() && standard_metadata.egress_rid != 0) {
            result_rewrite.apply();
        }
    }
}

#endif
