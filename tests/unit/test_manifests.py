"""A cached manifest is only trusted while the stores and files it names exist."""

from musc_tasks.manifests import PoolsRef, TokenGeometry, TokensRef, missing_paths


def test_missing_paths_finds_every_named_store_that_is_gone(tmp_path):
    store = tmp_path / "tokens.zarr"
    store.mkdir()
    pool = tmp_path / "pool-0"
    pool.mkdir()
    geometry = TokenGeometry(image_size=224, patch_size=14, n_layers=2)
    tokens = TokensRef(
        product="bolt",
        store_path=str(store),
        geometry=geometry,
        image_ids=("a",),
        token_rows=(0,),
        extracted=1,
        reused=0,
    )
    pools = PoolsRef(
        product="bolt",
        tokens=tokens,
        pool_paths=(str(pool), str(tmp_path / "pool-1")),
        pairs_computed=1,
        pairs_reused=0,
    )
    assert missing_paths((tokens,)) == []
    assert missing_paths((pools,)) == [str(tmp_path / "pool-1")]
    store.rmdir()
    assert missing_paths((tokens,)) == [str(store)]
    assert sorted(missing_paths([pools])) == sorted([str(tmp_path / "pool-1"), str(store)])
    assert missing_paths("not a manifest") == []
