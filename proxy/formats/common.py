"""Pieces both wire formats share."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any

import msgspec

from proxy.canonical import Message, Request, Usage, fingerprint, remember_wire, wire_of
from proxy.errors import BadRequest
from proxy.memo import MIN_CHARS, memo

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
_decode_fields = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
_decode_items = msgspec.json.Decoder(list[msgspec.Raw]).decode


def decode_json(body: bytes) -> dict[str, Any]:
    """Decodes a client's request body; malformed JSON is a 400 naming the position."""
    try:
        raw = _decode(body)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"Invalid JSON in request body: {exc}", code="invalid_json") from None
    except RecursionError:
        raise BadRequest("Invalid JSON in request body: nested too deeply",
                         code="invalid_json") from None
    if not isinstance(raw, dict):
        raise BadRequest("Invalid request: the body must be a JSON object")
    return raw


def _top_fields(body: bytes) -> dict[str, msgspec.Raw] | None:
    """The body's top-level fields, each still its JSON text (not decoded), when the body
    is a JSON object; None otherwise. Reading 200 KB this way allocates next to nothing."""
    try:
        return _decode_fields(body)
    except (msgspec.DecodeError, RecursionError):
        return None


def items(raw: msgspec.Raw) -> list[msgspec.Raw] | None:
    """The items of a JSON array, each still its JSON text; None if ``raw`` is not one."""
    try:
        return _decode_items(raw)
    except (msgspec.DecodeError, RecursionError):
        return None


def decode_raw(raw: msgspec.Raw) -> Any:
    return _decode(raw)


_ONE_PASS_FROM = 8 * 1024


@functools.lru_cache(maxsize=8)
def _splitter(known: frozenset[str]) -> Callable[[bytes], Any]:
    """A decoder of a body whose top-level fields are all among ``known``, into a struct of
    their JSON texts and its messages as an array of them: one pass over the body."""
    fields: list[tuple[str, Any, Any]] = [("messages", list[msgspec.Raw], msgspec.NODEFAULT)]
    fields += [(name, msgspec.Raw | msgspec.UnsetType, msgspec.UNSET)
               for name in sorted(known - {"messages"})]
    split = msgspec.defstruct("Split", fields, forbid_unknown_fields=True)
    return msgspec.json.Decoder(split).decode


def split_body(body: bytes, *, checked: bool = True, known: frozenset[str] = frozenset()
               ) -> tuple[dict[str, msgspec.Raw], list[msgspec.Raw]] | None:
    """The body's top-level fields and its messages, all still JSON text; None unless the
    body is a JSON object in valid UTF-8 whose ``messages`` is an array (``decode_json``
    then says what is wrong). Unless ``checked``, the UTF-8 is not checked: for a caller
    that decodes every part (or one seen whole).

    A large body with no top-level field outside ``known`` (the fields its API documents)
    is read in one pass; any other in two (its fields, then its messages), which costs less
    for a small body than filling the one pass's struct."""
    if checked and not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if known and len(body) > _ONE_PASS_FROM:
        try:
            split = _splitter(known)(body)
        except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
            pass
        else:
            values = msgspec.structs.asdict(split)
            messages = values.pop("messages")
            return {k: v for k, v in values.items() if v is not msgspec.UNSET}, messages
    fields = _top_fields(body)
    messages = items(fields["messages"]) if fields and "messages" in fields else None
    if fields is None or messages is None:
        return None
    return fields, messages


# What decoding a part of a request raises for a body the full decode must look at (and
# what the full decode raises for a body it cannot read).
NOT_DECODED = (BadRequest, msgspec.MsgspecError, TypeError, AttributeError, ValueError,
               KeyError)


def decode_request(body: bytes, known: frozenset[str],
                   whole: Callable[[dict[str, Any]], Request],
                   add_messages: Callable[[Request, list[msgspec.Raw]], None]) -> Request:
    """A client's request: its top-level fields made into a request by ``whole`` (given no
    messages), and its messages added by ``add_messages``, which decodes each on its own or
    copies one seen before (``messages_by_content``). A body that fails there is decoded
    whole by ``whole``, which names what is wrong. Every part is decoded, or is a message
    seen (and decoded) whole before: no UTF-8 check of the body first."""
    split = split_body(body, checked=False, known=known)
    if split is not None:
        fields, raws = split
        try:
            decoded = {key: _decode(value) for key, value in fields.items()
                       if key != "messages"}
            request = whole({**decoded, "messages": []})
            add_messages(request, raws)
            remember_wire(request, {**decoded, "messages": raws})
            return request
        except NOT_DECODED:
            pass  # the full decode below names what is wrong
    return whole(decode_json(body))


_clone = msgspec.msgpack.Decoder(Message).decode


def messages_by_content(fmt: str, raws: list[msgspec.Raw],
                        decode: Callable[[dict[str, Any], int], Message]
                        ) -> list[tuple[Message, msgspec.Raw, bytes]]:
    """Each message of a body, still JSON text in ``raws``, decoded by ``decode(json,
    index)``: a message seen before (an agent resends its whole history every turn) is not
    decoded again but copied from ``proxy.memo``, where the canonical form of each message
    is kept by its JSON text, as its ``fingerprint``. With each message come its JSON text
    and its fingerprint, for ``remember_wire``.

    Each request gets messages of its own, however many others sent the same text: a
    plugin's change to one never reaches another. Raises what ``decode`` raises (or a
    ``msgspec`` error), for the caller to fall back to the full decode that names it."""
    texts = [bytes(raw) for raw in raws]
    out = []
    for index, (raw, text, printed) in enumerate(zip(raws, texts, memo.lookup_all(fmt, texts),
                                                     strict=True)):
        if printed is None:
            message = decode(_decode(text), index)
            printed = fingerprint(message)
            if len(text) >= MIN_CHARS:  # the canonical form is kept too: twice the size
                memo.put(fmt, text, printed, 2 * len(text))
        else:
            message = _clone(printed)
        out.append((message, raw, printed))
    return out


def usage_from(usage: dict[str, Any], input_key: str, output_key: str, details_key: str,
               known: AbstractSet[str]) -> Usage:
    """Usage from an OpenAI-style usage object (Chat Completions and Responses name the
    same counts differently): cached tokens under ``details_key``, the rest kept."""
    details = usage.get(details_key)
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    prompt, completion = usage.get(input_key), usage.get(output_key)
    return Usage(input_tokens=prompt if isinstance(prompt, int) else 0,
                 output_tokens=completion if isinstance(completion, int) else 0,
                 cache_read_tokens=cached if isinstance(cached, int) else 0,
                 extra=known_extra(usage, known))


def peek_request(body: bytes, deferred: AbstractSet[str],
                 build: Callable[[dict[str, Any]], Request], known: frozenset[str] = frozenset()
                 ) -> tuple[Request, int] | None:
    """A request's top-level fields without its ``deferred`` ones (its messages, tools...:
    where its size is), and how many messages it has; None when only a full decode can say
    what is wrong with the body.

    ``build`` makes the request from the decoded fields, given no messages and none of the
    other deferred fields; the request remembers the body's fields, the deferred ones
    still as JSON text, which encodes back as it came."""
    split = split_body(body, known=known)
    if split is None:
        return None
    fields, messages = split
    try:
        decoded = {key: _decode(value) for key, value in fields.items() if key not in deferred}
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return None
    request = build({**decoded, "messages": []})
    remember_wire(request, {**fields, **decoded, "messages": messages})
    return request, len(messages)


def preview_request(peeked: Request, keep_newest: int, deferred: AbstractSet[str],
                    decode: Callable[[bytes], Request],
                    add_messages: Callable[[Request, list[msgspec.Raw]], object]
                    ) -> tuple[Request, int] | None:
    """The request ``peek_request`` left undecoded (``peeked``: its top-level fields) with
    only its first and ``keep_newest`` newest messages decoded (what a record shows of a
    long history), and how many were left out; None if it is not a request ``decode`` can
    read that far.

    With no other ``deferred`` field in the body (tools, say), the messages kept are added
    to a copy of ``peeked`` by ``add_messages``: its top-level fields are not read again
    (the copy shares them: nothing here changes them). Otherwise the body is rebuilt with
    the messages kept and decoded by ``decode``."""
    fields = wire_of(peeked)
    messages = fields.get("messages") if fields is not None else None
    if fields is None or not isinstance(messages, list):
        return None
    kept, omitted = _kept(messages, keep_newest)
    if not any(key in fields for key in deferred if key != "messages"):
        request = copy.copy(peeked)
        try:
            add_messages(request, kept)
            return request, omitted
        except NOT_DECODED:
            pass  # as decode_request: its full decode says what is wrong
    request = decode(_encode({**fields, "messages": kept}))
    request.headers = peeked.headers
    request.extra.pop("hookproxy", None)  # read already, as peeked's was
    return request, omitted


def _kept(messages: list[Any], keep_newest: int) -> tuple[list[Any], int]:
    """What a record shows of ``messages``: the first and the ``keep_newest`` newest, and
    how many others there are."""
    kept = messages if len(messages) <= keep_newest + 1 else \
        [messages[0], *messages[-keep_newest:]]
    return kept, len(messages) - len(kept)


def as_sent(peeked: Request, keep_newest: int, reason: str) -> tuple[dict[str, Any], int]:
    """What a record can show of a request ``peek_request`` read whose messages no decoder
    reads (``preview_request`` raised): its top-level fields as the client sent them, its
    first and ``keep_newest`` newest messages as they came, ``not_decoded`` saying why
    they are shown so, and how many messages were left out."""
    fields = wire_of(peeked) or {}
    view: dict[str, Any] = {}
    for key, value in fields.items():
        if key != "hookproxy":  # read already, as a decoded request's is
            view[key] = _decode(value) if isinstance(value, msgspec.Raw) else value
    messages = fields.get("messages")
    omitted = 0
    if isinstance(messages, list):
        kept, omitted = _kept(messages, keep_newest)
        view["messages"] = [_decode(raw) if isinstance(raw, msgspec.Raw) else raw
                            for raw in kept]
    view["not_decoded"] = reason
    return view, omitted


def unmodeled_role(message: Message) -> str | None:
    """The wire role of a message whose role the canonical model has no name for (OpenAI's
    legacy ``function``, a role added last week): decoded as a user turn whose ``extra``
    keeps the role, it goes back as it came to its own format and is refused by the
    other with a 400 naming the role. None for any other message (OpenAI's ``developer``
    is a system message)."""
    role = message.extra.get("role")
    if role is None or (role == "developer" and message.role == "system"):
        return None
    return str(role)


def known_extra(raw: dict[str, Any], known: AbstractSet[str]) -> dict[str, Any]:
    """The fields of ``raw`` the proxy does not model, kept to pass through untouched."""
    if raw.keys() <= known:  # the usual case, decided in C
        return {}
    return {k: v for k, v in raw.items() if k not in known}


def parse_data_url(url: str) -> tuple[str, str]:
    """``data:image/png;base64,AAAA`` -> ("image/png", "AAAA"); other URLs -> ("", "")."""
    if not url.startswith("data:"):
        return "", ""
    header, _, data = url[5:].partition(",")
    media_type = header.split(";", 1)[0]
    return media_type, data
