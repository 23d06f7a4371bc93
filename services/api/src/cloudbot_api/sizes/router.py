from __future__ import annotations

from fastapi import APIRouter

from cloudbot_api.deps import CurrentPrincipal, SettingsDep
from cloudbot_api.errors import problem_responses
from cloudbot_api.sizes.schemas import SizeList, SizeOut
from cloudbot_common.sizes import offered_sizes

router = APIRouter(prefix="/sizes", tags=["sizes"])


@router.get(
    "",
    response_model=SizeList,
    summary="The machine sizes you may pick",
    responses=problem_responses(401),
)
async def list_sizes(_: CurrentPrincipal, settings: SettingsDep) -> SizeList:
    return SizeList(
        items=[
            SizeOut(
                name=size.name,
                instance_type=size.instance_type,
                cpus=size.cpus,
                memory_mib=size.memory_mib,
                default=size.name == settings.default_instance_size,
            )
            for size in offered_sizes(settings.instance_sizes)
        ]
    )
