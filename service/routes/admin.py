"""POST /admin/reload: check CHECKPOINT_DIR now, instead of waiting for the poll or Redis."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from service.auth import require_operator
from service.dependencies import reloader_of
from service.errors import error_responses
from service.reloader import Reloader
from service.schemas import ReloadReport

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_operator)],
    responses=error_responses(401, 403),
)


@router.post("/reload")
async def reload(reloader: Annotated[Reloader, Depends(reloader_of)]) -> ReloadReport:
    """Loads the newest checkpoint if it is not the one serving; says what happened."""
    return await reloader.check("admin")
