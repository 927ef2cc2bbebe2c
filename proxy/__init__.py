"""hookproxy: an LLM gateway whose pipeline is shaped by pluggy plugins."""

from proxy.canonical import (
    ImagePart,
    Message,
    Request,
    Response,
    StreamEnd,
    StreamEvent,
    StreamStart,
    TextDelta,
    TextPart,
    Tool,
    ToolCallDelta,
    ToolCallPart,
    ToolCallStart,
    ToolChoice,
    ToolResultPart,
    Usage,
)
from proxy.context import PipelineError, Reject, RequestContext
from proxy.hookspecs import hookimpl
from proxy.pipeline import DROP

__all__ = [
    "DROP",
    "ImagePart",
    "Message",
    "PipelineError",
    "Reject",
    "Request",
    "RequestContext",
    "Response",
    "StreamEnd",
    "StreamEvent",
    "StreamStart",
    "TextDelta",
    "TextPart",
    "Tool",
    "ToolCallDelta",
    "ToolCallPart",
    "ToolCallStart",
    "ToolChoice",
    "ToolResultPart",
    "Usage",
    "hookimpl",
]
__version__ = "0.1.0"
