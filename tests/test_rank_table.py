"""The cells of the rank table, not only its size: the rank of every (layer, module kind), the
sums per layer, the column names and the totals in the title."""

from __future__ import annotations

from senslora import AllocationConfig
from senslora.allocation import Allocation
from senslora.report import rank_grid, rank_table, short_kinds

KINDS = ("attention.self.query", "attention.output.dense", "output.dense")


def bert_like(ranks: dict[tuple[int, str], int]) -> Allocation:
    names = {(layer, kind): f"bert.encoder.layer.{layer}.{kind}" for layer, kind in ranks}
    return Allocation(
        ranks={names[key]: rank for key, rank in ranks.items()},
        shapes={name: (16, 8) for name in names.values()},
        metrics={},
        weights={},
        config=AllocationConfig(avg_rank=3),
    )


def cells(table) -> list[list[str]]:
    columns = [list(column.cells) for column in table.columns]
    return [list(row) for row in zip(*columns, strict=True)]


def test_short_kinds_tell_the_module_kinds_apart():
    assert short_kinds(list(KINDS)) == {
        "attention.self.query": "query",
        "attention.output.dense": "attention.output.dense",
        "output.dense": "output.dense",
    }


def test_rank_table_cells_and_sums():
    ranks = {(0, "attention.self.query"): 1, (0, "attention.output.dense"): 5}
    ranks |= {(0, "output.dense"): 2, (1, "attention.self.query"): 4}
    ranks |= {(1, "output.dense"): 3}  # layer 1 has no attention.output.dense
    table = rank_table(bert_like(ranks))
    assert [column.header for column in table.columns] == [
        "layer",
        "query",
        "attention.output.dense",
        "output.dense",
        "sum",
    ]
    assert cells(table) == [["0", "1", "5", "2", "8"], ["1", "4", "", "3", "7"]]
    # 15 ranks of 16x8 matrices cost 15 * 24 parameters; uniform r=3 on 5 matrices: 5 * 3 * 24
    assert "total rank 15 over 5 matrices, 360 trainable parameters" in table.title
    assert "(uniform r=3: 360)" in table.title
    assert "SRA, score=combined, avg 3" in table.title


def test_modules_without_a_layer_index_get_a_dash_row():
    allocation = bert_like({(0, "attention.self.query"): 2})
    allocation.ranks["classifier"] = 6
    allocation.shapes["classifier"] = (2, 16)
    layers, kinds, grid = rank_grid(allocation.ranks)
    assert layers == [0, None] and kinds == ["query", "classifier"]
    assert grid == {(0, "query"): 2, (None, "classifier"): 6}
    assert cells(rank_table(allocation, title="t")) == [["0", "2", "", "2"], ["-", "", "6", "6"]]
