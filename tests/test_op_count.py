"""Operations dispatched per forward and backward pass (python -m fcmae.bench --count_ops)."""
from fcmae.cli import benchmark
from fcmae.models.op_count import count_ops

# convnextv2_base, sparse backend, batch 64, 224 px, mask ratio 0.6, on the meta device: 4,038
# operations before the GRN's backward was written out and the stages' rows found once per forward
BASE_SPARSE_B64_MAX_OPS = 3230


def test_count_ops_reports_every_backend_that_runs(capsys):
    records = benchmark.main(["--count_ops", "--model", "convnextv2_atto", "--batch_size", "2"])
    rows = {r["row"]: r for r in records}
    assert {"dense", "sparse"} <= rows.keys()
    for r in records:
        assert r["forward_ops"] > 0 and r["backward_ops"] > 0
        assert r["total_ops"] == r["forward_ops"] + r["backward_ops"]
    table = capsys.readouterr().out
    assert "convnextv2_atto" in table and "sparse" in table and "dense" in table


def test_base_sparse_step_dispatches_at_most_the_budget():
    count = count_ops("convnextv2_base", "sparse", 64, (224, 224), device="meta")
    assert count.total <= BASE_SPARSE_B64_MAX_OPS, count.total
