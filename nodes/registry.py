"""Every node of the pack, for ComfyUI's extension entry point and for the pack's tools and tests."""
from comfy_api.latest import ComfyExtension, io

from .dataset_node import DatasetNode
from .lr_finder_node import LRFinderNode
from .rates_node import LearningRatesNode
from .schedule_node import LRScheduleNode
from .train_node import TrainNode

NODES: list[type[io.ComfyNode]] = [LRScheduleNode, LearningRatesNode, DatasetNode, TrainNode, LRFinderNode]

# node id -> class and -> display name, read from the schemas.
_SCHEMAS = {node: node.define_schema() for node in NODES}
NODE_CLASS_MAPPINGS = {schema.node_id: node for node, schema in _SCHEMAS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {schema.node_id: schema.display_name for schema in _SCHEMAS.values()}


class LoraLabExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
