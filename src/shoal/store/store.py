"""`Store`: Shoal's persistent state behind one object, shared by the API server and workers.

Each method is one short transaction, so a `Store` may be used from many threads, and several
processes may open the same database. The methods live in one module per area; this class only
joins them and opens the database. Not here: HTTP, blobs on disk, or training.
"""

from __future__ import annotations

from .accounts import Accounts
from .curves import Curves
from .db import make_engine, migrate
from .events import Events
from .files import Files
from .fine_tuned import FineTunedModels
from .jobs import Jobs
from .queue import Queue
from .usage import Usages


class Store(Accounts, Usages, Files, FineTunedModels, Jobs, Queue, Events, Curves):
    """Organizations, keys, usage, files, fine-tuned models, jobs and their queue, events,
    checkpoints and learning curves."""

    @classmethod
    def open(cls, url: str | None = None) -> Store:
        """Connect to `url` (default: $SHOAL_DATABASE_URL, else `$SHOAL_HOME/shoal.db`) and
        migrate it to the newest schema.

        In a worker process, open a Store there rather than inheriting one across fork.
        """
        engine = make_engine(url)
        migrate(engine)
        return cls(engine)
