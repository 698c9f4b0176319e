"""Adaptive draft depth and tree selection, with simulated timings (no model, no clock)."""

from __future__ import annotations

from specedge_cli.drafting.draft_tree import ROOT, DraftShape, DraftTree
from specedge_cli.drafting.planner import FIRST_DEPTH, MAX_AUTO_DEPTH, DepthPlanner


def test_depth_fills_the_flight_time():
    planner = DepthPlanner()
    assert planner.depth == FIRST_DEPTH  # nothing measured yet
    for _ in range(20):
        planner.observe_draft(decodes=4, seconds=0.040)  # 10 ms per draft step
        planner.observe_verify(wait_s=0.060, depth=8, accepted=8)  # 60 ms round trip + verify
    assert planner.depth == 6
    for _ in range(30):
        planner.observe_verify(wait_s=0.150, depth=8, accepted=8)  # a slower link: draft deeper
    assert planner.depth == 15


def test_depth_is_capped_where_drafts_stop_being_accepted():
    planner = DepthPlanner()
    for _ in range(30):
        planner.observe_draft(decodes=1, seconds=0.001)
        planner.observe_verify(wait_s=0.100, depth=8, accepted=1)  # time for 100 steps, but 1 in 8 accepted
    assert 0.4 < planner.acceptance < 0.6
    assert planner.depth <= 4


def test_limits_and_fixed_depth():
    planner = DepthPlanner(max_depth=64)
    for _ in range(10):
        planner.observe_draft(decodes=1, seconds=0.001)
        planner.observe_verify(wait_s=1.0, depth=16, accepted=16)
    assert planner.depth == MAX_AUTO_DEPTH
    planner.max_depth = 5  # the hub's limit
    assert planner.depth == 5 and planner.shape(room=3) == DraftShape(depth=3, budget=3)
    fixed = DepthPlanner(fixed_depth=24, tree_budget=20, tree_width=3, max_depth=64)
    assert fixed.shape(room=100) == DraftShape(depth=24, budget=20, width=3)
    auto_tree = DepthPlanner(tree_budget=20, tree_width=3)
    assert auto_tree.shape(room=100) == DraftShape(depth=FIRST_DEPTH, budget=min(20, 3 * FIRST_DEPTH), width=3)


def _tree(scores_by_parent: dict[int, list[tuple[int, float]]]) -> DraftTree:
    """Nodes added level by level; scores are cumulative log-probabilities."""
    tree = DraftTree(root=[1, 2, 3], root_sequence=0, slot=0, shape=DraftShape(depth=3, budget=4, width=2))
    pending = [ROOT]
    while pending:
        parent = pending.pop(0)
        for token, score in scores_by_parent.get(parent, []):
            pending.append(tree.add(token, parent, score))
    return tree


def test_selection_spends_the_budget_on_the_likeliest_nodes():
    # root -> a (-0.1), b (-2.0); a -> c (-0.2), d (-1.5); c -> e (-0.3)
    tree = _tree({ROOT: [(10, -0.1), (11, -2.0)], 0: [(12, -0.2), (13, -1.5)], 2: [(14, -0.3)]})
    tree.selected = tree.select(budget=4)
    assert tree.wire_tokens == [10, 12, 13, 14]  # b (-2.0) is the least likely: left out
    assert tree.wire_parents == [ROOT, 0, 0, 1]  # parents before children, re-indexed
    assert tree.guess_leaf() == 4 and [tree.tokens[n] for n in tree.path_to(4)] == [10, 12, 14]
    tree.selected = tree.select(budget=3)
    assert tree.wire_tokens == [10, 12, 14]  # a confident draft: a chain


def test_calibration_learns_how_often_the_target_takes_each_rank():
    from specedge_cli.drafting.sampling import Calibration

    calibration = Calibration()
    assert calibration.acceptance(0, 0.55) == 0.55  # the prior: the draft's own probability
    for _ in range(200):  # the target always takes the draft's first choice
        calibration.observe([(7, 0.55), (8, 0.30)], drawn=7)
    assert calibration.acceptance(0, 0.55) > 0.95
    assert calibration.acceptance(1, 0.30) < 0.05
    assert calibration.acceptance(0, 0.95) > 0.95  # an unseen bin follows its rank's rate
    assert Calibration().acceptance(0, 0.95) == 0.95  # ... which starts at the draft's probability
