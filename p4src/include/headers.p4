/* Headers and metadata. The aggregation header mirrors wire.HEADER_FIELDS. */
#ifndef SWITCHREDUCE_HEADERS_P4
#define SWITCHREDUCE_HEADERS_P4

header ethernet_h {
    bit<48> dst_addr;
    bit<48> src_addr;
    bit<16> ether_type;
}

header ipv4_h {
    bit<4>  version;
    bit<4>  ihl;
    bit<8>  diffserv;
    bit<16> total_len;
    bit<16> identification;
    bit<3>  flags;
    bit<13> frag_offset;
    bit<8>  ttl;
    bit<8>  protocol;
    bit<16> hdr_checksum;
    bit<32> src_addr;
    bit<32> dst_addr;
}

header udp_h {
    bit<16> src_port;
    bit<16> dst_port;
    bit<16> length;
    bit<16> checksum;
}

header switchreduce_h {
    bit<8>  msg_type;
    bit<8>  rank;
    bit<16> job_id;
    bit<1>  version;
    bit<15> slot;
    bit<8>  exponent;
    bit<8>  format;
    bit<16> round;
    bit<16> count;
    bit<32> chunk;
    bit<32> length;
    bit<64> session;
}

header element_h {
    bit<32> value;
}

struct headers_t {
    ethernet_h     ethernet;
    ipv4_h         ipv4;
    udp_h          udp;
    switchreduce_h sr;
    element_h[K]   elements;
}

struct metadata_t {
    bit<8>  world_size;
    bit<8>  quorum;       /* contributions that complete a round: world_size, or fewer */
    bit<16> slot_base;
    bit<16> slot_count;
    bit<16> mcast_grp;
    bit<64> session;
    bit<32> value_base;   /* row * K: first cell of the row in the value register */
    bit<32> keep;         /* all ones to add to the stored sums, zero to overwrite them */
}

#endif
