"""The rolling-window protocol (DESIGN §5): every target exactly once, bounded context, batches."""

import pytest
import torch

from kotara.windows import batches, make_batch, rolling_windows


def scored_targets(windows):
    """Absolute indices of the targets each window scores, in order."""
    return [t for w in windows for t in range(w.target_start, w.input_end + 1)]


@pytest.mark.parametrize("num_tokens", [2, 3, 17, 64, 65, 101])
@pytest.mark.parametrize("max_length", [1, 4, 16])
def test_every_target_scored_exactly_once_for_every_stride(num_tokens, max_length):
    for stride in range(1, max_length + 1):
        windows = rolling_windows(num_tokens, max_length, stride)
        assert scored_targets(windows) == list(range(1, num_tokens)), (num_tokens, max_length, stride)
        for w in windows:
            assert 1 <= w.input_length <= max_length
            assert 1 <= w.num_targets <= min(stride, w.input_length)
            # The first scored target has max_length - stride extra tokens of context unless the text is too short.
            context_of_first = w.target_start - w.input_start
            assert context_of_first >= 1
            assert context_of_first == min(w.target_start, max_length - (w.num_targets - 1))


def test_stride_equal_max_length_loses_no_token_and_matches_hand_computation():
    # 10 tokens, L = S = 4: targets 1..9 in blocks [1,5), [5,9), [9,10); the short last block still
    # gets a full window of context, x[5:9].
    windows = rolling_windows(10, 4, 4)
    assert [(w.input_start, w.input_end, w.target_start) for w in windows] == [(0, 4, 1), (4, 8, 5), (5, 9, 9)]


def test_small_stride_keeps_full_context():
    windows = rolling_windows(12, 6, 2)
    assert [(w.input_start, w.input_end, w.target_start) for w in windows] == [
        (0, 2, 1),
        (0, 4, 3),
        (0, 6, 5),
        (2, 8, 7),
        (4, 10, 9),
        (5, 11, 11),
    ]


@pytest.mark.parametrize(("max_length", "stride"), [(8, 0), (8, 9), (8, -1), (0, 1)])
def test_bad_window_arguments_are_rejected(max_length, stride):
    with pytest.raises(ValueError, match="stride|max_length"):
        rolling_windows(10, max_length, stride)


def test_too_short_text_has_no_window():
    assert rolling_windows(1, 4, 4) == []
    assert rolling_windows(0, 4, 4) == []


def test_batch_rows_hold_window_inputs_targets_and_scored_mask():
    token_ids = torch.arange(100, 113)  # 13 tokens, distinct values so misplacement shows
    windows = rolling_windows(13, 5, 3)
    batch = make_batch(token_ids, windows[:3], pad_id=-7)
    assert batch.input_ids.shape == (3, 5)
    for row, w in enumerate(windows[:3]):
        length = w.input_length
        assert batch.input_ids[row, :length].tolist() == token_ids[w.input_start : w.input_end].tolist()
        assert (batch.input_ids[row, length:] == -7).all()
        assert batch.targets[row, :length].tolist() == token_ids[w.input_start + 1 : w.input_end + 1].tolist()
        assert batch.targets[row][batch.scored[row]].tolist() == list(range(100 + w.target_start, 101 + w.input_end))
    all_scored = torch.cat([b.targets[b.scored] for b in batches(token_ids, windows, 2)])
    assert all_scored.tolist() == token_ids[1:].tolist()


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(torch.arange(5), rolling_windows(5, 2, 2), 0))
