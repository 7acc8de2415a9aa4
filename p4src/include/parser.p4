/* Parser, checksum controls and deparser. */
#ifndef SWITCHREDUCE_PARSER_P4
#define SWITCHREDUCE_PARSER_P4

#define SR_EXTRACT_ELEMENT(i) pkt.extract(hdr.elements.next);

parser SwitchReduceParser(packet_in pkt, out headers_t hdr, inout metadata_t meta,
                          inout standard_metadata_t standard_metadata) {
    state start {
        pkt.extract(hdr.ethernet);
        transition select(hdr.ethernet.ether_type) {
            ETHERTYPE_IPV4: parse_ipv4;
            default: accept;
        }
    }
    state parse_ipv4 {
        pkt.extract(hdr.ipv4);
        transition select(hdr.ipv4.version, hdr.ipv4.ihl, hdr.ipv4.protocol) {
            (4, 5, IP_PROTO_UDP): parse_udp;
            default: accept;
        }
    }
    state parse_udp {
        pkt.extract(hdr.udp);
        transition select(hdr.udp.dst_port) {
            UDP_PORT_MIN &&& 0xFFF0: parse_switchreduce;  /* 0xBEE0 .. 0xBEEF */
            default: accept;
        }
    }
    state parse_switchreduce {
        pkt.extract(hdr.sr);
        transition select(hdr.udp.length) {
            SR_ALONE_UDP_LENGTH: accept;  /* a header alone */
            default: parse_elements;
        }
    }
    state parse_elements {
        FOR_EACH_ELEMENT(SR_EXTRACT_ELEMENT)
        transition accept;
    }
}

control SwitchReduceVerifyChecksum(inout headers_t hdr, inout metadata_t meta) {
    apply { }
}

control SwitchReduceComputeChecksum(inout headers_t hdr, inout metadata_t meta) {
    apply {
        update_checksum(
            hdr.sr.isValid() && hdr.sr.msg_type != MSG_DATA,  /* forwarded packets pass untouched */
            { hdr.ipv4.version, hdr.ipv4.ihl, hdr.ipv4.diffserv, hdr.ipv4.total_len,
              hdr.ipv4.identification, hdr.ipv4.flags, hdr.ipv4.frag_offset, hdr.ipv4.ttl,
              hdr.ipv4.protocol, hdr.ipv4.src_addr, hdr.ipv4.dst_addr },
            hdr.ipv4.hdr_checksum,
            HashAlgorithm.csum16);
    }
}

control SwitchReduceDeparser(packet_out pkt, in headers_t hdr) {
    apply {
        pkt.emit(hdr.ethernet);
        pkt.emit(hdr.ipv4);
        pkt.emit(hdr.udp);
        pkt.emit(hdr.sr);
        pkt.emit(hdr.elements);
    }
}

#endif
