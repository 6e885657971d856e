"""Each rank of a multi-process run compiles into its own inductor cache folder."""

import pytest

from torchtitan_mot.compat.torchtitan_0_2_2 import isolate_compile_cache_per_rank


@pytest.mark.parametrize(
    "world_size, rank, expected", [("2", "1", "shared/rank1"), ("1", "0", "shared")]
)
def test_ranks_get_their_own_cache_folder(
    tmp_path, monkeypatch, world_size: str, rank: str, expected: str
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "shared"))
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("RANK", rank)
    isolate_compile_cache_per_rank()
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(tmp_path / expected)
