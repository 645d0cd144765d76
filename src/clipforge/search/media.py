"""The server's access to indexed files: the video route (``GET /videos/{item_id}`` sends the
video file of an indexed video segment, so that the page can play it from the moment found),
and :func:`open_item_image`, how every route that reads an indexed image opens it.

Like thumbnails, the file is reached by integer item id only (the index maps the id to the
file it recorded; no path from the request reaches the file system, and none appears in an
answer), behind the server's middleware: the access token, the Host check, the per-client
limit.  The file is sent by Starlette's :class:`~starlette.responses.FileResponse`, which
answers ``Range`` requests with 206 and the bytes asked for (416 for a range past the end), as
a browser needs to seek without downloading the whole video.  A file changed since it was
indexed is not sent: the segments' times would not fit it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse
from PIL import Image

from ..video import VIDEO_MEDIA_TYPES, media_type
from .index import IndexUnavailableError
from .schema import IndexName, ItemId

if TYPE_CHECKING:
    from .index import SearchIndex
    from .server import _Services

log = logging.getLogger(__name__)


def open_item_image(index: SearchIndex, item_id: int, purpose: str, index_name: str
                    ) -> Image.Image:
    """Item ``item_id``'s image (a video segment's frame), opened for ``purpose`` (a word for
    the log: "thumbnail", "locate"); 404 when the index has no such item or its file can no
    longer be read, and the index's own unavailability passed on (the server answers it as the
    index being down, not as a missing item)."""
    try:
        return index.open_image(item_id)
    except KeyError as exc:
        raise HTTPException(404, f"no item {item_id}") from exc
    except IndexUnavailableError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        log.warning("%s of item %d of %s: %s", purpose, item_id, index_name, exc)
        raise HTTPException(404, f"the image of item {item_id} cannot be read; it may have "
                                 "changed since it was indexed") from exc


def add_video_routes(app: FastAPI, services: _Services) -> None:
    """Add ``GET /videos/{item_id}`` (``?index=NAME`` with several indexes) to ``app``."""
    types = {kind: {} for kind in sorted(set(VIDEO_MEDIA_TYPES.values()))}

    @app.get("/videos/{item_id}", tags=["items"], response_class=FileResponse,
             responses={200: {"content": types, "description": "the whole video file"},
                        206: {"content": types, "description": "the byte range asked for"},
                        416: {"description": "the range asked for is past the file's end"}})
    def video(item_id: ItemId, index: IndexName = None) -> FileResponse:
        """The video file of an indexed video segment (a result with ``start`` and ``end``),
        whole or by byte ranges (``Range: bytes=...``); seek to the segment's ``start``.
        Cached by the browser only ("private"), as thumbnails are."""
        service = services.pick(index)
        with service.reading():
            try:
                path, st = service.index.video_file(item_id)
            except KeyError as exc:
                raise HTTPException(404, f"no item {item_id}") from exc
            except ValueError as exc:
                raise HTTPException(404, f"item {item_id} is an image, not a video segment"
                                    ) from exc
            except IndexUnavailableError:
                raise
            except OSError as exc:
                log.warning("video of item %d of %s: %s", item_id, service.name, exc)
                raise HTTPException(404, f"the video of item {item_id} cannot be read; it may "
                                         "have changed since it was indexed") from exc
        return FileResponse(path, stat_result=st, media_type=media_type(path),
                            headers={"Cache-Control": "private, max-age=3600"})
