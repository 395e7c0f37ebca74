"""placeholder"""
from __future__ import annotations
import html
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from etcd_compute.errors import ECError
router = APIRouter(prefix="/ui", include_in_schema=False)
def mount(app: FastAPI) -> None:
    pass
def stop(app: FastAPI) -> None:
    pass
def error_page(request: Request, exc: ECError, status: int) -> Response:
    return HTMLResponse(f"<p>{html.escape(str(exc))}</p>", status)
