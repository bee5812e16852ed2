"""Uploaded files' rows: one per upload, each naming the blob of its bytes by sha256.

Equal uploads share a blob, so a blob may be deleted only when `file_in_use` reaches 0 after its
last row goes. Lists page like OpenAI's: `after` is the id of the last file of the previous page,
in (created_at, id) order. Not here: the blobs themselves (the API layer's blob directory).
"""

from __future__ import annotations

import time

from sqlalchemy import delete, func, select, update

from .base import StoreBase, after as after_cursor, page
from .ids import new_id
from .schema import FileRow

FILE_STATUSES = ("uploaded", "processed", "error")


class Files(StoreBase):
    """Rows of the Files API."""

    def add_file(self, org_id: str, filename: str, purpose: str, bytes: int, sha256: str,
                 status: str = "processed", file_id: str | None = None) -> FileRow:
        """Record an uploaded file (its blob must be stored already); `file_id` defaults to a new
        `file-…` id."""
        if status not in FILE_STATUSES:
            raise ValueError(f"status must be one of {FILE_STATUSES}, got {status!r}")
        row = FileRow(id=file_id or new_id("file-"), org_id=org_id, filename=filename,
                      purpose=purpose, bytes=bytes, sha256=sha256, status=status,
                      created_at=time.time())
        with self._write() as s:
            s.add(row)
        return row

    def get_file(self, org_id: str | None, file_id: str) -> FileRow | None:
        """The file, or None when missing or another organization's (org_id None: any)."""
        with self._read() as s:
            row = s.get(FileRow, file_id)
        return row if row is not None and org_id in (None, row.org_id) else None

    def list_files(self, org_id: str, purpose: str | None = None, limit: int = 10000,
                   order: str = "desc", after: str | None = None) -> tuple[list[FileRow], bool]:
        """One page of an organization's files and whether more follow.

        Args:
            order: `desc` (newest first) or `asc`, by created_at then id.
            after: id of the last file of the previous page; an unknown id gives an empty page.
        """
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be asc or desc, got {order!r}")
        desc = order == "desc"
        cols = (FileRow.created_at, FileRow.id)
        stmt = select(FileRow).where(FileRow.org_id == org_id)
        if purpose is not None:
            stmt = stmt.where(FileRow.purpose == purpose)
        stmt = stmt.order_by(*(c.desc() if desc else c.asc() for c in cols))
        with self._read() as s:
            if after is not None:
                cursor = s.get(FileRow, after)
                if cursor is None or cursor.org_id != org_id:
                    return [], False
                stmt = stmt.where(after_cursor(cols, (cursor.created_at, cursor.id), desc))
            return page(s, stmt, limit)

    def delete_file(self, org_id: str, file_id: str) -> bool:
        """Delete the row (not the blob); False when missing or another organization's."""
        with self._write() as s:
            done = s.execute(delete(FileRow).where(FileRow.id == file_id,
                                                   FileRow.org_id == org_id))
            return done.rowcount == 1

    def set_file_status(self, file_id: str, status: str, details: str | None = None) -> None:
        """Set a file's status (uploaded, processed or error) and status_details."""
        if status not in FILE_STATUSES:
            raise ValueError(f"status must be one of {FILE_STATUSES}, got {status!r}")
        with self._write() as s:
            s.execute(update(FileRow).where(FileRow.id == file_id)
                      .values(status=status, status_details=details))

    def file_in_use(self, sha256: str) -> int:
        """How many file rows (of any organization) use the blob with this sha256."""
        with self._read() as s:
            return s.scalar(select(func.count()).select_from(FileRow)
                            .where(FileRow.sha256 == sha256)) or 0
