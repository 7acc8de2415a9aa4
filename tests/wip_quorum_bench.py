import sys
sys.path.insert(0, '.')
import numpy as np
import test_window as tw
for quorum in (None, 3):
    for slots in (8, 32):
        net = tw.Network(4, slots, seed=1, quorum=quorum, seconds_per_byte=8 / 20e6, late={3: 0.06})
        times = []
        for call in range(4):
            inputs = [tw.synthetic_tensor(call, r, 30 * tw.K, "float32") for r in range(4)]
            start = net.now
            net.allreduce(inputs)
            times.append([round((t.progress_at - start) * 1000, 1) for t in net.transfers])
        print("quorum", quorum, "slots", slots, "ms to last result per rank, per call:", times[1:], "late chunks", [s.late for s in net.stats])
