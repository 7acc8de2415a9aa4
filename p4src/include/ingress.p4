/* Ingress: admission (jobs, workers), slot aggregation, plain forwarding.
 * The soft switch's SwitchReduceIngress is the same logic in Python. */
#ifndef SWITCHREDUCE_INGRESS_P4
#define SWITCHREDUCE_INGRESS_P4

/* Read a stored sum into the packet (retransmission reply). */
#define SR_READ_SUM(i) value.read(hdr.elements[i].value, meta.value_base + (i));

/* First packet of a round overwrites (keep = 0), later ones add (keep = all ones). */
#define SR_ADD_SUM(i)                                                         \
    value.read(stored, meta.value_base + (i));                                \
    hdr.elements[i].value = hdr.elements[i].value + (stored & meta.keep);     \
    value.write(meta.value_base + (i), hdr.elements[i].value);

control SwitchReduceIngress(inout headers_t hdr, inout metadata_t meta,
                            inout standard_metadata_t standard_metadata) {
    @id(1) counter(NUM_DROP_REASONS, CounterType.packets_and_bytes) drops;
    @id(2) counter(MAX_JOBS, CounterType.packets_and_bytes) aggregated;
    @id(3) counter(MAX_JOBS, CounterType.packets_and_bytes) results;
    @id(4) counter(MAX_JOBS, CounterType.packets_and_bytes) retransmit_replies;

    @id(1) register<bit<64>>(POOL_SIZE) slot_session;     /* session that last used the slot */
    @id(2) register<bit<16>>(ROWS) round;                 /* round each row holds */
    @id(3) register<bit<32>>(ROWS) bitmap;                /* ranks that contributed to it */
    @id(4) register<bit<8>>(ROWS) arrivals;               /* contributions mod world size */
    @id(5) register<bit<8>>(ROWS) exponent;               /* max exponent byte */
    @id(6) register<bit<32>>(ROWS * K) value;             /* the sums: row * K + element */
    @id(7) register<bit<8>>(ROWS) row_format;             /* what the round sums: format */
    @id(8) register<bit<32>>(ROWS) row_length;            /* ... its tensor length */
    @id(9) register<bit<32>>(ROWS) row_chunk;             /* ... and the chunk of the tensor */
    @id(10) register<bit<32>>(ROWS) seen;                 /* ranks whose packet of it came */

    bit<32> stored;

    @id(1) action drop(bit<32> reason) {
        drops.count(reason);
        mark_to_drop(standard_metadata);
    }

    @id(2) action set_job(bit<8> world_size, bit<8> quorum, bit<16> slot_base,
                   bit<16> slot_count, bit<16> mcast_grp, bit<64> session) {
        meta.world_size = world_size;
        meta.quorum = quorum;
        meta.slot_base = slot_base;
        meta.slot_count = slot_count;
        meta.mcast_grp = mcast_grp;
        meta.session = session;
    }

    @id(1) table jobs {
        key = { hdr.sr.job_id: exact; }
        actions = { set_job; NoAction; }
        default_action = NoAction();
        size = MAX_JOBS;
    }

    @id(3) action admit_worker() { }

    @id(2) table workers {
        key = {
            hdr.sr.job_id: exact;
            hdr.sr.rank: exact;
            standard_metadata.ingress_port: exact;
            hdr.ipv4.src_addr: exact;
            hdr.udp.src_port: exact;
        }
        actions = { admit_worker; NoAction; }
        default_action = NoAction();
        size = 8192;
    }

    @id(4) action set_egress_port(bit<9> port) {
        standard_metadata.egress_spec = port;
    }

    @id(3) table forward {
        key = { hdr.ethernet.dst_addr: exact; }
        actions = { set_egress_port; NoAction; }
        default_action = NoAction();
        size = 1024;
    }

    /* Turn the packet into an answer of the given kind, addressed back to where it came from. */
    @id(5) action make_reply(bit<8> kind) {
        hdr.sr.msg_type = kind;
        bit<48> mac = hdr.ethernet.dst_addr;
        hdr.ethernet.dst_addr = hdr.ethernet.src_addr;
        hdr.ethernet.src_addr = mac;
        bit<32> ip = hdr.ipv4.dst_addr;
        hdr.ipv4.dst_addr = hdr.ipv4.src_addr;
        hdr.ipv4.src_addr = ip;
        bit<16> port = hdr.udp.dst_port;
        hdr.udp.dst_port = hdr.udp.src_port;
        hdr.udp.src_port = port;
        hdr.udp.checksum = 0;
    }

    @id(6) action read_sums() {
        FOR_EACH_ELEMENT(SR_READ_SUM)
    }

    @id(7) action add_sums() {
        FOR_EACH_ELEMENT(SR_ADD_SUM)
    }

    apply {
        /* Aggregation traffic is whatever is addressed to the port range, well formed or not. */
        if (!hdr.udp.isValid() || (hdr.udp.dst_port & 0xFFF0) != UDP_PORT_MIN) {
            if (!hdr.ethernet.isValid() || !forward.apply().hit) {
                drop(DROP_NO_ROUTE);
            }
        } else if (!hdr.sr.isValid()
                   /* a header alone: a RELEASE, or a contribution without elements (priming) */
                   || (hdr.udp.length == SR_ALONE_UDP_LENGTH && hdr.sr.msg_type != MSG_RELEASE
                       && hdr.sr.count != 0)
                   /* else K elements, and no RELEASE */
                   || (hdr.udp.length != SR_ALONE_UDP_LENGTH
                       && (!hdr.elements[K - 1].isValid() || hdr.udp.length != SR_UDP_LENGTH
                           || hdr.sr.msg_type == MSG_RELEASE))
                   || (hdr.sr.msg_type != MSG_DATA && hdr.sr.msg_type != MSG_RESEND
                       && hdr.sr.msg_type != MSG_RELEASE)
                   || hdr.sr.count > K) {
            drop(DROP_BAD_HEADER);
        } else if (!jobs.apply().hit) {
            drop(DROP_UNKNOWN_JOB);
        } else if (hdr.sr.rank >= meta.world_size) {
            drop(DROP_RANK_OUT_OF_RANGE);
        } else if ((bit<16>)hdr.sr.slot >= meta.slot_count) {
            drop(DROP_SLOT_OUT_OF_RANGE);
        } else if (!workers.apply().hit) {
            drop(DROP_UNBOUND_WORKER);
        } else if (hdr.sr.session != meta.session) {
            /* Another run's packet, or a guess: tell the sender (nothing answers a RELEASE). */
            drops.count(DROP_BAD_SESSION);
            if (hdr.sr.msg_type == MSG_RELEASE) {
                mark_to_drop(standard_metadata);
            } else {
                make_reply(MSG_STALE);
                standard_metadata.egress_spec = standard_metadata.ingress_port;
            }
        } else {
            bit<32> index = (bit<32>)(meta.slot_base + (bit<16>)hdr.sr.slot);
            bit<32> row = (index << 1) | (bit<32>)hdr.sr.version;
            meta.value_base = row * K;

            /* A new session on this slot: make its first round look new in both copies. */
            bit<64> owner;
            slot_session.read(owner, index);
            bit<16> row_round;
            if (owner != meta.session) {
                slot_session.write(index, meta.session);
                row_round = hdr.sr.round - 1;
                round.write(index << 1, row_round);
                round.write((index << 1) | 1, row_round);
                seen.write(index << 1, 0xFFFFFFFF);
                seen.write((index << 1) | 1, 0xFFFFFFFF);
            } else {
                round.read(row_round, row);
            }
            bit<16> ahead = hdr.sr.round - row_round;  /* serial-number order */
            /* A new round overwrites the row's round before last, whose sums a rank late for
             * a quorum may still need (its copy lost, or not yet asked for): only once every
             * rank has them. A rank sends a round after it has the last one's sums: a packet
             * says so for the round before its own, if the other row holds it, and for this
             * row's, if older. A RELEASE says so for its own round (a quorum job's rank, for a
             * result that came before it sent the round, and for each slot's last of a call). */
            bit<32> rank_bit = (bit<32>)1 << hdr.sr.rank;
            bit<32> seen_here;
            seen.read(seen_here, row);
            if (ahead != 0 && ahead < 0x8000) {
                seen_here = seen_here | rank_bit;
            }
            bit<16> other_round;
            round.read(other_round, row ^ 1);
            if (ahead < 0x8000 && other_round == hdr.sr.round - 1) {
                bit<32> seen_other;
                seen.read(seen_other, row ^ 1);
                seen.write(row ^ 1, seen_other | rank_bit);
            }
            bit<32> everyone = ((bit<32>)1 << meta.world_size) - 1;
            bit<32> ranks;
            bitmap.read(ranks, row);
            bit<8> count;
            arrivals.read(count, row);
            bit<8> round_format;
            row_format.read(round_format, row);
            bit<32> round_length;
            row_length.read(round_length, row);
            bit<32> round_chunk;
            row_chunk.read(round_chunk, row);

            if (ahead >= 0x8000) {
                drop(DROP_STALE);  /* an older round, delayed in the network */
            } else if (hdr.sr.msg_type == MSG_RELEASE) {
                if (ahead == 0) {
                    seen.write(row, seen_here | rank_bit);
                }
                mark_to_drop(standard_metadata);
            } else if (ahead != 0 && meta.quorum != meta.world_size
                       && (seen_here & everyone) != everyone) {  /* a quorum job's only */
                seen.write(row, seen_here);
                drop(DROP_AHEAD);  /* a rank lacks the row's sums: it may still ask for them */
            } else if (ahead == 0 && count == ROW_REFUSED) {
                drops.count(DROP_MISMATCH);  /* the round was refused: say so again */
                make_reply(MSG_REFUSED);
                standard_metadata.egress_spec = standard_metadata.ingress_port;
            } else if (ahead == 0 && (ranks & rank_bit) != 0) {
                if (count != 0) {
                    /* Incomplete: the contribution is in, the round waits for other ranks.
                     * Say so to the sender alone, with the ranks the row holds, so that it
                     * stops resending what is not lost. */
                    drops.count(DROP_DUPLICATE);
                    make_reply(MSG_WAITING);
                    hdr.sr.length = ranks;
                    standard_metadata.egress_spec = standard_metadata.ingress_port;
                } else {
                    /* Complete: the worker lost the result. Send it again, to it alone. */
                    if (hdr.elements[0].isValid()) {  /* a header alone carries no sums */
                        read_sums();
                    }
                    exponent.read(hdr.sr.exponent, row);
                    hdr.sr.length = ranks;
                    make_reply(MSG_RESULT);
                    retransmit_replies.count((bit<32>)hdr.sr.job_id);
                    standard_metadata.egress_spec = standard_metadata.ingress_port;
                }
            } else if (ahead == 0 && (round_format != hdr.sr.format
                                      || round_length != hdr.sr.length
                                      || round_chunk != hdr.sr.chunk)) {
                /* Ranks disagree on what they sum (format, length or chunk): no rank may
                 * take this round's sums. */
                arrivals.write(row, ROW_REFUSED);
                drops.count(DROP_MISMATCH);
                make_reply(MSG_REFUSED);
                standard_metadata.mcast_grp = meta.mcast_grp;
            } else if (ahead == 0 && count == 0) {
                /* Late: a quorum completed the round without this rank. Its contribution is
                 * not added. The result's multicast went to it too; a RESEND says it may have
                 * lost that: it gets the sums, whose bitmap says it is not in them. */
                drops.count(DROP_LATE);
                if (hdr.sr.msg_type == MSG_RESEND) {
                    if (hdr.elements[0].isValid()) {  /* a header alone carries no sums */
                        read_sums();
                    }
                    exponent.read(hdr.sr.exponent, row);
                    hdr.sr.length = ranks;
                    make_reply(MSG_RESULT);
                    standard_metadata.egress_spec = standard_metadata.ingress_port;
                } else {
                    mark_to_drop(standard_metadata);
                }
            } else {
                bit<8> max_exponent;
                if (ahead != 0) {  /* the first packet of a new round writes */
                    round.write(row, hdr.sr.round);
                    row_format.write(row, hdr.sr.format);
                    row_length.write(row, hdr.sr.length);
                    row_chunk.write(row, hdr.sr.chunk);
                    ranks = rank_bit;
                    seen.write(row, 0);  /* nobody has its sums yet */
                    count = 0;
                    meta.keep = 0;
                    max_exponent = hdr.sr.exponent;
                } else {           /* later ones add */
                    ranks = ranks | rank_bit;
                    meta.keep = 0xFFFFFFFF;
                    exponent.read(max_exponent, row);
                    if (hdr.sr.exponent > max_exponent) {
                        max_exponent = hdr.sr.exponent;
                    }
                }
                bitmap.write(row, ranks);
                if (hdr.elements[0].isValid()) {  /* a header alone leaves the sums be */
                    add_sums();
                }
                exponent.write(row, max_exponent);
                count = count + 1;
                if (count == meta.quorum) {
                    count = 0;
                }
                arrivals.write(row, count);
                aggregated.count((bit<32>)hdr.sr.job_id);
                if (count != 0) {
                    mark_to_drop(standard_metadata);  /* consumed: it lives on in the registers */
                } else {
                    hdr.sr.exponent = max_exponent;
                    hdr.sr.length = ranks;
                    make_reply(MSG_RESULT);
                    results.count((bit<32>)hdr.sr.job_id);
                    standard_metadata.mcast_grp = meta.mcast_grp;
                }
            }
        }
    }
}

#endif
