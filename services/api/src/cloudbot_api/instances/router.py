from fastapi import APIRouter

router = APIRouter(prefix="/instances", tags=["instances"])
