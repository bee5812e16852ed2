"""The Files API: upload (multipart), list, retrieve, content, delete; each file owned by an org.

Bytes are streamed into the blob store while hashed (413 past the size limit, nothing left
behind); rows name blobs by sha256, so equal uploads share one blob and it is deleted with its
last row. Another org's file is a 404, as an unknown one.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ...blobs import BlobStore, TooLarge
from ...serving.errors import ServingError
from ..auth import Principal
from ..deps import caller, services

router = APIRouter()
UPLOAD_PURPOSES = ("fine-tune", "assistants", "batch", "vision", "user_data", "evals")
CHUNK = 1 << 20


def blobs_of(s) -> BlobStore:
    if "blobs" not in s.extra:
        s.extra["blobs"] = BlobStore(s.settings.files_dir)
    return s.extra["blobs"]


def blobs(request: Request) -> BlobStore:
    return blobs_of(services(request))


def file_object(row) -> dict:
    return {"id": row.id, "object": "file", "bytes": row.bytes, "created_at": int(row.created_at),
            "filename": row.filename, "purpose": row.purpose, "status": row.status,
            "status_details": row.status_details, "expires_at": None}


def not_found(file_id: str) -> ServingError:
    return ServingError(404, f"No such File object: {file_id}", param="id", code="file_not_found")


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit", "10000")
    try:
        v = int(raw)
    except ValueError:
        v = 0
    if not 1 <= v <= 10000:
        raise ServingError(400, f"limit: must be an integer in [1, 10000], got {raw!r}", param="limit")
    return v


@router.post("/v1/files")
async def upload_file(request: Request, who: Principal = Depends(caller)):
    """Upload a file (multipart/form-data: `file`, `purpose`)."""
    s = services(request)
    limit = s.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise ServingError(413, f"file: larger than the {limit} byte limit", param="file",
                           code="file_too_large")
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as e:
        raise ServingError(400, f"file: could not read the multipart body ({e})", param="file") from None
    try:
        purpose = form.get("purpose")
        if not isinstance(purpose, str) or not purpose:
            raise ServingError(400, "purpose: required", param="purpose")
        if purpose not in UPLOAD_PURPOSES:
            raise ServingError(400, f"purpose: must be one of {', '.join(UPLOAD_PURPOSES)}; "
                                    f"got {purpose!r}", param="purpose")
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ServingError(400, "file: required (a file part)", param="file")

        async def chunks():
            while chunk := await upload.read(CHUNK):
                yield chunk

        try:
            sha, size = await blobs(request).put_stream(chunks(), limit)
        except TooLarge as e:
            raise ServingError(413, str(e), param="file", code="file_too_large") from None
        name = (upload.filename or "upload").replace("\\", "/").rsplit("/", 1)[-1][:255] or "upload"
        row = await asyncio.to_thread(s.store.add_file, who.org_id, name, purpose, size, sha)
        return file_object(row)
    finally:
        await form.close()


@router.get("/v1/files")
async def list_files(request: Request, who: Principal = Depends(caller)):
    """Your organization's files, newest first (`purpose`, `limit`, `order`, `after`)."""
    q = request.query_params
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ServingError(400, "order: must be asc or desc", param="order")
    rows, more = await asyncio.to_thread(services(request).store.list_files, who.org_id,
                                         q.get("purpose"), _limit(request), order, q.get("after"))
    data = [file_object(r) for r in rows]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


async def _get(request: Request, who: Principal, file_id: str):
    row = await asyncio.to_thread(services(request).store.get_file, who.org_id, file_id)
    if row is None:
        raise not_found(file_id)
    return row


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, request: Request, who: Principal = Depends(caller)):
    """One file's metadata."""
    return file_object(await _get(request, who, file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request, who: Principal = Depends(caller)):
    """The file's bytes."""
    row = await _get(request, who, file_id)
    data = await asyncio.to_thread(blobs(request).read, row.sha256)
    return Response(data, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request, who: Principal = Depends(caller)):
    """Delete a file (its bytes go with the last file that names them)."""
    s = services(request)
    row = await _get(request, who, file_id)
    if not await asyncio.to_thread(s.store.delete_file, who.org_id, file_id):
        raise not_found(file_id)
    if await asyncio.to_thread(s.store.file_in_use, row.sha256) == 0:
        blobs(request).delete(row.sha256)
    return {"id": file_id, "object": "file", "deleted": True}
