from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Response, status

from cloudbot_api.deps import AuditorDep, CurrentPrincipal, ResourcesDep, UowDep
from cloudbot_api.errors import problem_responses
from cloudbot_api.pagination import Before, Limit
from cloudbot_api.webhooks.schemas import (
    DeliveryPage,
    WebhookCreate,
    WebhookCreated,
    WebhookList,
    WebhookOut,
)
from cloudbot_api.webhooks.service import WebhookService
from cloudbot_common import webhooks

router = APIRouter(prefix="/user/webhooks", tags=["webhooks"])


async def get_service(uow: UowDep, resources: ResourcesDep, audit: AuditorDep) -> WebhookService:
    return WebhookService(
        uow,
        vault=resources.vault,
        audit=audit,
        allowed_networks=webhooks.networks(resources.settings.webhook_allowed_networks),
    )


ServiceDep = Annotated[WebhookService, Depends(get_service)]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookCreated,
    summary="Add a webhook: your machines' state changes, POSTed and signed",
    description=(
        "Every state change of your machines (and an `instance.idle_warning` before an idle "
        "stop) is POSTed as JSON, signed in the Standard Webhooks format (`webhook-id`, "
        "`webhook-timestamp`, `webhook-signature` with the secret shown once here), at "
        "least once, in order per machine, retried with backoff when the receiver fails."
    ),
    responses=problem_responses(401, 403, 409, 413, 422),
)
async def create_webhook(
    body: WebhookCreate, principal: CurrentPrincipal, service: ServiceDep, response: Response
) -> WebhookCreated:
    response.headers["Cache-Control"] = "no-store"
    return await service.create(principal.user_id, body, actor=principal.actor)


@router.get(
    "", response_model=WebhookList, summary="Your webhooks", responses=problem_responses(401)
)
async def list_webhooks(principal: CurrentPrincipal, service: ServiceDep) -> WebhookList:
    rows = await service.list(principal.user_id)
    return WebhookList(items=[WebhookOut.model_validate(w) for w in rows])


@router.delete(
    "/{webhook_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Remove a webhook (what it is still owed is dropped)",
    responses=problem_responses(401, 403, 404, 422),
)
async def delete_webhook(
    webhook_id: uuid.UUID, principal: CurrentPrincipal, service: ServiceDep
) -> Response:
    await service.delete(principal.user_id, webhook_id, actor=principal.actor)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{webhook_id}/deliveries",
    response_model=DeliveryPage,
    summary="The webhook's deliveries, newest first",
    responses=problem_responses(401, 404, 422),
)
async def webhook_deliveries(
    webhook_id: uuid.UUID,
    principal: CurrentPrincipal,
    service: ServiceDep,
    before: Before = None,
    limit: Limit = 50,
) -> DeliveryPage:
    return await service.deliveries(principal.user_id, webhook_id, before, limit)
