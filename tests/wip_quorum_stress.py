import sys, random
sys.path.insert(0, '.')
import numpy as np
import test_window as tw
fails = 0
for case in range(400):
    rnd = random.Random(case)
    n = rnd.randint(2, 5); k = rnd.randint(1, n - 1); slots = rnd.randint(1, 8)
    loss = rnd.choice([0.0, 0.05, 0.3]); reorder = rnd.choice([0.0, 0.3]); dup = rnd.choice([0.0, 0.1])
    late = {n - 1: rnd.choice([0.0, 0.05, 0.3])}
    net = tw.Network(n, slots, seed=case, quorum=k, loss=loss, reorder=reorder, duplicate=dup, late=late)
    try:
        for call in range(3):
            chunks = rnd.randint(1, 20)
            inputs = [np.arange(chunks * tw.K, dtype=np.int32) * (r + 1) + 7 * call for r in range(n)]
            if rnd.random() < 0.5:
                inputs = [tw.synthetic_tensor(case + call, r, chunks * tw.K, "float32") for r in range(n)]
            results = net.allreduce(inputs)
            for r in results[1:]:
                assert np.array_equal(r, results[0]), "ranks differ"
            if inputs[0].dtype == np.int32:
                total = np.sum(inputs, axis=0)
                for c in range(chunks):
                    part = slice(c * tw.K, (c + 1) * tw.K)
                    out = [r for r, t in enumerate(net.transfers) if c in t.late()]
                    assert len(out) == n - k, (c, out)
                    exp = total[part] - sum(inputs[r][part] for r in out)
                    assert np.array_equal(results[0][part], exp.astype(np.int32)), "sum"
    except AssertionError as e:
        fails += 1
        print("case", case, dict(n=n, k=k, slots=slots, loss=loss, reorder=reorder, dup=dup, late=late), str(e)[:100])
print("fails", fails)
