"""The pack's ComfyUI nodes (V1 API). Node ids are a public API: never rename them."""
from .schedule_node import LRScheduleNode
from .rates_node import LearningRatesNode
from .dataset_node import DatasetNode
from .train_node import TrainNode
from .lr_finder_node import LRFinderNode

NODE_CLASS_MAPPINGS = {
    "LoRALabLRSchedule": LRScheduleNode,
    "LoRALabLearningRates": LearningRatesNode,
    "LoRALabDataset": DatasetNode,
    "LoRALabTrain": TrainNode,
    "LoRALabLRFinder": LRFinderNode,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoRALabLRSchedule": "LR Schedule",
    "LoRALabLearningRates": "UNet/TE Learning Rates",
    "LoRALabDataset": "LoRA Dataset",
    "LoRALabTrain": "Train LoRA",
    "LoRALabLRFinder": "LR Finder",
}
