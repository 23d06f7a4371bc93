"""The sizes users may pick: each offered size names an EC2 instance type (INSTANCE_SIZES),
and this table says what that type is. The API lists it (GET /api/sizes) and the
provisioner launches the type; a size naming a type missing here is refused at start."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Hardware:
    cpus: int
    memory_mib: int


# EC2 instance types an operator may offer: vCPUs and memory as AWS lists them.
INSTANCE_TYPES: dict[str, Hardware] = {
    "t3.micro": Hardware(2, 1024),
    "t3.small": Hardware(2, 2048),
    "t3.medium": Hardware(2, 4096),
    "t3.large": Hardware(2, 8192),
    "t3.xlarge": Hardware(4, 16384),
    "t3.2xlarge": Hardware(8, 32768),
    "t3a.small": Hardware(2, 2048),
    "t3a.medium": Hardware(2, 4096),
    "t3a.large": Hardware(2, 8192),
    "t3a.xlarge": Hardware(4, 16384),
    "m7i.large": Hardware(2, 8192),
    "m7i.xlarge": Hardware(4, 16384),
    "m7i.2xlarge": Hardware(8, 32768),
    "m7g.large": Hardware(2, 8192),
    "m7g.xlarge": Hardware(4, 16384),
    "c7i.large": Hardware(2, 4096),
    "c7i.xlarge": Hardware(4, 8192),
    "c7i.2xlarge": Hardware(8, 16384),
    "r7i.large": Hardware(2, 16384),
    "r7i.xlarge": Hardware(4, 32768),
}


@dataclass(frozen=True, slots=True)
class Size:
    name: str
    instance_type: str
    cpus: int
    memory_mib: int


def offered_sizes(instance_sizes: dict[str, str]) -> list[Size]:
    """The offered sizes (INSTANCE_SIZES: name -> EC2 type), in the order configured."""
    return [
        Size(name, itype, INSTANCE_TYPES[itype].cpus, INSTANCE_TYPES[itype].memory_mib)
        for name, itype in instance_sizes.items()
    ]
