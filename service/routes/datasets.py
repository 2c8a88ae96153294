"""GET /datasets: the prepared datasets under DATA_DIR, which a train job names as data.dataset.

Read from each dataset's manifest by ``contract.datasets`` (the API never imports ``worker``).
An API that does not share its workers' DATA_DIR lists what its own DATA_DIR holds, which may be
nothing (docker-compose.yml mounts the workers' data volume into the API, read-only).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from contract.datasets import PreparedDataset, prepared_datasets
from contract.settings import Settings
from service.auth import require_operator, settings_of
from service.errors import error_responses

router = APIRouter(
    tags=["train jobs"],
    dependencies=[Depends(require_operator)],
    responses=error_responses(401, 403),
)


class DatasetList(BaseModel):
    datasets: list[PreparedDataset] = Field(description="by name")


@router.get("/datasets", response_model=DatasetList)
def list_datasets(settings: Annotated[Settings, Depends(settings_of)]) -> DatasetList:
    """Prepared datasets under DATA_DIR, from their manifests; folders still being prepared, or
    not datasets, are left out."""
    return DatasetList(datasets=prepared_datasets(settings.data_dir))
