"""`conversa sessions rekey`: re-encrypt an encrypted store in place with a new key."""

from __future__ import annotations

import click

from ._options import common_options, storage_url


@click.command("rekey")
@click.option(
    "--old-key-env", metavar="NAME", required=True, help="The variable holding the current key."
)
@click.option(
    "--new-key-env", metavar="NAME", required=True, help="The variable holding the new key."
)
@common_options
@click.pass_context
def rekey_sessions(
    ctx: click.Context,
    old_key_env: str,
    new_key_env: str,
    storage: str | None,
    debug: bool,
) -> None:
    """Re-encrypt every session of an encrypted store with a new key, in place.

    Each session is rewritten under its lease and keeps its times. Safe to interrupt: run
    it again with the same keys to finish. Afterwards use ?encryption_key_env=NEW_NAME.
    """
    from ._runner import run

    url = storage_url(ctx, storage)
    counts = run(ctx, lambda: _rekey(url, old_key_env, new_key_env))
    click.echo(
        f"rekeyed {counts['rekeyed']} sessions ({counts['finished']} finished from an earlier "
        f"run, {counts['already']} already on the new key); now open the store with "
        f"?encryption_key_env={new_key_env}"
    )


async def _rekey(url: str, old_env: str, new_env: str) -> dict[str, int]:
    from ..storage import open_storage
    from ..storage.encrypted import key_from_env, rekey, split_key_option

    plain_url, _ = split_key_option(url)  # the keys come from the two options
    old, new = key_from_env(old_env), key_from_env(new_env)
    counts = {"rekeyed": 0, "finished": 0, "already": 0}
    store = open_storage(plain_url)
    try:
        async for done in rekey(store, old, new):
            counts[done.done] += 1
            click.echo(f"{done.done} {done.session_id}")
    finally:
        await store.close()
    return counts
