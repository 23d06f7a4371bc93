from __future__ import annotations

from pydantic import BaseModel, Field


class SizeOut(BaseModel):
    name: str = Field(description="What to send as `size` when creating an instance")
    instance_type: str = Field(description="The EC2 instance type it runs on")
    cpus: int = Field(description="Virtual CPUs")
    memory_mib: int = Field(description="Memory in MiB")
    default: bool = Field(description="The size an instance gets when `size` is omitted")


class SizeList(BaseModel):
    items: list[SizeOut]
