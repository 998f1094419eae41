"""The Mirador wire protocol, version 1.

Transport
    ZeroMQ. The daemon binds a ROUTER socket, by default at
    ``ipc://$XDG_RUNTIME_DIR/mirador/miradord.sock`` (see ``mirador.client.paths``); a client
    connects a DEALER socket. Every message is exactly ONE ZeroMQ frame holding ONE msgpack map
    with string keys (the client's DEALER sends ``[payload]``; the daemon's ROUTER sees
    ``[identity, payload]``). One connection may carry many requests at once.
    A daemon started with ``--listen tcp://HOST:PORT`` also accepts TCP connections, only with
    the CURVE security mechanism and a client public key listed in its authorized_keys (see
    ``mirador.client.remote``); the messages are the same.

Requests (client -> daemon)
    ``{"v": 1, "id": ID, "type": TYPE, ...fields}``

    - ``v``: protocol version, the integer 1.
    - ``id``: a string of 1..64 characters chosen by the client, unique among its open requests.
      Every reply to the request carries it back.
    - ``type`` and its fields:

      ``ask``     ``text`` (non-empty string, required); ``stages`` (list of stage names,
                  optional: default, the stages the router picks for the question);
                  ``sequential`` (bool, optional: run the stages one after another, each
                  receiving the previous answers); ``chain`` (a configured chain's name,
                  optional: run its steps instead of stages); ``options`` (map, optional:
                  ``max_tokens`` int 1..8192, ``temperature`` number 0..2, ``seed`` int
                  0..2**32-1 (the same seed and prompt give the same answer), for every stage);
                  ``session`` (a name, optional: continue that conversation); ``memory`` (bool,
                  optional, default true: false is incognito, nothing recalled or stored);
                  ``history`` (list of {question, answer} maps, optional: earlier turns of this
                  conversation, given by the client, e.g. an HTTP chat's messages; they go to
                  the stages that take history, incognito or not); ``system`` (string,
                  optional: the client's own instructions, added after each stage's system
                  prompt); ``model`` (a manifest model's name, optional: that model answers
                  alone, with ``system`` as its system prompt, no stages, nothing recalled or
                  stored; it cannot be combined with ``stages``, ``chain`` or ``sequential``).
      ``cancel``  ``target``: the ``id`` of an ``ask`` sent on the same connection.
      ``status``  no fields.
      ``stats``   no fields.
      ``memory``  ``op``: list | search | show | forget | forget_all | export | import, with
                  ``query`` (search), ``target`` (show, forget: a memory id), ``targets``
                  (forget: a list of ids instead), ``limit`` (list, search), ``records``
                  (import: maps with id, question, answer and optionally route, models,
                  session, ts, rating, as export gives them; a record whose id is stored already is
                  skipped, and one import request is written all or nothing).
      ``rate``    ``score`` (integer 1..5); ``query_id`` (optional: default, the last answer).
      ``learn``   ``op``: stats | reset.
      ``hint``    ``text``: what the user has typed so far; ``session``, ``memory`` (optional, as
                  for ``ask``: false, incognito, starts no prefill: it would recall). The daemon
                  starts loading the models that text will probably need and, as a background
                  job, evaluates the prompt the question will have as far as it is known (system
                  prompt, recalled memories, session history, the typed words) into the models
                  that take it, so that on Enter only the rest is evaluated (nothing is
                  generated or remembered).
      ``jobs``    ``op``: list | cancel, with ``target`` (cancel: a job id).
      ``cache``   ``op``: list | clear | stats (the answer cache of speculation).
      ``train``   ``op``: status | data | run | history | rollback | off (LoRA training of an
                  embedded model), with ``model`` (optional: default, the first trainable one),
                  ``wait`` (run: reply once the run has ended), ``version`` (rollback: which
                  deployed adapter; default, the one before the active one).
      ``models``  ``op``: list | ps | load | unload, with ``name`` (load, unload: a model of the
                  manifest).
      ``ping``    no fields.

    Unknown extra keys are ignored, so newer clients can add optional fields.

Replies (daemon -> client)
    ``{"v": 1, "id": ID, "event": NAME, "final": BOOL, ...fields}``

    A request's replies end with exactly one whose ``final`` is true; nothing with that ``id``
    follows it. In order:

    ``ask``    ``start`` {query_id, route (simple | medium | complex | requested | chain),
               reason, mode (progressive | sequential | chain), stages: [names], session, type
               (what the learner keys on), plan, learned (null, or {plan, default, evidence}
               when the user's ratings chose the plan), power {profile, battery, changed,
               dropped?, models?}, speculation {cached: null or {stage, question, similarity,
               age_s, source}, warmed: {stage: {job, tokens}}, rejected?}};
               unless incognito, ``memory`` {recalled: [{id, question, similarity}], history:
               n}; then, per stage, ``stage_start`` {stage, model}, ``context`` {stage,
               memory_ids} (the memories that stage was given), ``token`` {stage, model, text,
               confidence in [0, 1], logprob or null, cached?}..., ``stage_end`` {stage, model, tokens,
               first_token_s, duration_s, tokens_per_s, cancelled, cold (the model had to be
               loaded first: nothing had preloaded it), queued_s (time spent waiting for the
               model behind other questions), prompt_tokens, reused_tokens (already evaluated in
               the model's cache), cached?}; ``stage_start`` carries cached (with similarity,
               age_s, question) when the answer cache serves the stage, warmed when a prefill
               evaluated its prompt; then ``done`` {query_id,
               cancelled, metrics}: the answer is complete. When the exchange is to be
               remembered, ``done`` is not final: ``remembered`` {query_id, memory_id} follows
               (final) once it is stored on disk, or, if it could not be stored, ``error``
               {code: memory_unavailable, message: why, e.g. the disk is full and where}
               (final); a client may leave at ``done``. A daemon told to stop still finishes
               and acknowledges the writes in flight before it ends running asks. In
               progressive mode stages overlap, so their events interleave (each stage's own
               events stay in order).
               A stage whose model fails sends ``error`` {code, message, stage, model} (not
               final); its next model (a fallback) is tried, else the stage is skipped and the
               ask still ends with ``done``.
    ``cancel`` ``ack`` {target, found} (final). The cancelled ask then ends with ``done``
               whose ``cancelled`` is true: at once if it was waiting for a model, else
               after its running stages' next token.
    ``status`` ``status`` {pid, version, uptime_s, ready, ray_address, ray_started_here,
               ray_namespace, actors: [{name, stage, model, fallbacks, backend, server, loaded,
               busy, models: {name: loaded}, generating, waiting (generations waiting for the
               model), placement, node_id, node_ip, hostname, pid}], memory: {enabled, memories,
               bytes, path, placement, node_id, node_ip, hostname, pid}, power {profile,
               measured, forced, battery, sensor_error}, queue {waiting, generating,
               in_flight, max_waiting, max_waiting_per_client}, clients {connected,
               queued_bytes (replies waiting for slow clients), dropped, buffer_bytes,
               stall_s}, routes, chains} (final).
    ``memory`` ``memory`` {records: [...]} or {forgotten: n} or {imported: n, skipped: n, ids:
               [the ids added]} (final).
    ``rate``   ``rated`` {query_id, type, plan, rating} (final).
    ``hint``   ``hint`` {predictions: [{actor, model, p, why, loaded}], jobs: [prefill job ids],
               jobs_off: null or why no job started} (final), at once: the loads and prefills go
               on in the background.
    ``jobs``   ``jobs`` {jobs: [{id, kind, stage, state, progress, cost, saved, detail, created,
               started, ended}], allowed: null or why none run now, budget {...}} (list) or
               {cancelled: bool} (final).
    ``train``  ``train`` (final): status {enabled, allowed (null or why no run may work now),
               models: {name: {active, versions, last, last_why, running}}} (also after rollback
               and off); data {model, train: [{id, question, answer, rating}], held_out: [...],
               new, min_rating, trained_on_before}; run {job}; history {model, active, versions:
               [{version, created, deployed, why, examples, evaluation, train}]}.
    ``cache``  ``cache`` {entries: [...]} (list), {cleared: n} (clear), {entries, lookups, hits,
               hit_rate, saved_s, tokens_spent, tokens_used} (stats) (final).
    ``models`` ``models`` (final): list {models: [{name, backend, source, size_mb, roles,
               triggers, priority, actors, loaded_in, available}]}; ps {budget_mb, used_mb, pinned_by
               (how many questions hold pins),
               models: [{model, actor, backend, size_mb, node_id, pid, idle_s, load_s, in_use}]};
               load {loaded: [{actor, model, loaded, load_s, evicted, error}]}; unload
               {unloaded: [actor keys]}.
    ``learn``  ``learn`` {types: [{type, plans: [{plan, ratings, mean_rating}]}]} or {reset: n}.
    ``stats``  ``stats`` {queries, routes, errors, stages: [...], models: [...]} (final): per
               stage and per model, runs and p50/p95 of first-token time and tokens/s.
    ``ping``   ``pong`` {pid, version, ready} (final). ``ready`` turns true once the stage
               actors are up; an ``ask`` sent before that waits for them.

    A request that cannot be served at all gets one ``error`` {code, message} with ``final``
    true; if its ``id`` could not be read, the reply's ``id`` is null. The daemon keeps serving
    everyone else. Error codes:

    ``bad_frame`` (not one msgpack map), ``bad_version``, ``bad_request`` (a field missing or
    of the wrong type), ``too_large`` (a frame over MAX_FRAME_BYTES), ``unknown_type``,
    ``unknown_stage``, ``unknown_chain``, ``duplicate_id``, ``not_found``, ``memory_disabled``,
    ``learning_disabled``, ``unknown_model`` (not in the manifest), ``model_unused`` (no stage
    or chain runs it), ``model_error`` (it would not load), ``busy`` (an ask beyond the
    limits on waiting questions: see *Admission and control*), ``memory_unavailable`` (after
    ``done``: the exchange could not be stored), ``not_trainable`` (a train request for a model
    that is not an embedded one a stage runs), ``jobs_off`` (train run when the rules allow no
    run now: the power profile, the budget, missing packages; the message says which),
    ``shutting_down``, ``internal``.
    Stage errors (not final) use ``model_error`` (the model failed), ``unknown_model`` (the
    backend lacks it), ``backend_unavailable`` (e.g. Ollama is not running), ``timeout`` and
    ``stage_unavailable`` (its actor is not running: it crashed or its node left mid-answer, or
    it was not back, or no node could hold it, within ``[ray] actor_wait_s``).

Flow control
    The daemon never drops a reply to a client that reads: its ROUTER socket uses
    ROUTER_MANDATORY, and when a client's queue is full its replies wait in the daemon instead
    of being discarded. The stages never wait for a client: the model finishes at its own speed
    and turns to the next question, so a slow client never holds up others, and its slowness is
    never counted in a stage's ``timeout_s``. A client that stops reading costs bounded memory:
    once more than ``[daemon] client_buffer_mb`` of replies wait for it, or none has gone out for
    ``[daemon] client_stall_s`` while some wait, it is dropped: its waiting replies are
    discarded and its asks cancelled (the model generates nothing more for it); a later request
    on the connection starts afresh. When a client goes away, its asks are cancelled (noticed at
    the next frame sent to it; the model stops at its next token).

Admission and control
    A question *waits* from the moment it is admitted until one of its stages gets a model's
    turn, and again whenever none of its stages holds one while some are still to run (e.g.
    between its quick answer and its synthesis); a cancelled question no longer waits. An
    ``ask`` that would make more than ``[daemon] max_waiting`` questions wait (daemon-wide), or
    more than ``[daemon] max_waiting_per_client`` for its connection, is refused at once with one
    final ``error`` {code: "busy", message} (like Ollama's 503 "server busy"): try again later,
    or wait for (or cancel) the client's own questions first. ``status`` shows ``queue``.
    Control is never queued behind work: a ``cancel`` ends a waiting question at once (its
    ``done`` has ``cancelled`` true; its stages end with 0 tokens) and a generating one at its
    next token; ``status``, ``models`` and the preloader's loads reach a stage's actor however
    many generations wait in it.
"""

from __future__ import annotations

from typing import Any

import msgpack

VERSION = 1
MAX_FRAME_BYTES = 1 << 20
MAX_ID_CHARS = 64
REQUEST_TYPES = ("ask", "cancel", "status", "stats", "memory", "rate", "learn", "hint", "models", "jobs", "cache", "train",
                 "ping")
TRAIN_OPS = ("status", "data", "run", "history", "rollback", "off")
MODEL_OPS = ("list", "ps", "load", "unload")
MEMORY_OPS = ("list", "search", "show", "forget", "forget_all", "export", "import")


class ProtocolError(Exception):
    """A request the daemon cannot serve; becomes one final ``error`` reply."""

    def __init__(self, code: str, message: str, request_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


def pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def request(type_: str, request_id: str, **fields: Any) -> bytes:
    """Encode a request frame (client side)."""
    return pack({"v": VERSION, "id": request_id, "type": type_, **fields})


def reply(request_id: str | None, event: str, final: bool = False, **fields: Any) -> bytes:
    """Encode a reply frame (daemon side)."""
    return pack({"v": VERSION, "id": request_id, "event": event, "final": final, **fields})


def error_reply(err: ProtocolError) -> bytes:
    """The one final ``error`` reply to a request that cannot be served."""
    return reply(err.request_id, "error", final=True, code=err.code, message=err.message)


def decode_event(payload: bytes) -> dict[str, Any]:
    """Decode a reply frame (client side)."""
    obj = msgpack.unpackb(payload, raw=False)
    if not isinstance(obj, dict) or "event" not in obj:
        raise ProtocolError("bad_frame", "the daemon sent a frame that is not a reply")
    return obj


def parse_request(frames: list[bytes]) -> dict[str, Any]:
    """Decode and validate a request (daemon side). Raises ProtocolError with what is wrong."""
    if len(frames) != 1:
        raise ProtocolError("bad_frame", f"expected one frame per message, got {len(frames)}")
    payload = frames[0]
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError("too_large", f"frame of {len(payload)} bytes exceeds the limit of {MAX_FRAME_BYTES}")
    try:
        obj = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError("bad_frame", f"frame is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_frame", "frame must be a msgpack map")
    return check_request(obj)


def check_request(obj: dict[str, Any]) -> dict[str, Any]:
    """Validate a decoded request (daemon side; the HTTP API builds the same dicts). Raises
    ProtocolError with what is wrong."""
    rid = obj.get("id")
    if not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID_CHARS:
        raise ProtocolError("bad_request", f"'id' must be a string of 1..{MAX_ID_CHARS} characters")
    if obj.get("v") != VERSION:
        raise ProtocolError("bad_version", f"protocol version {obj.get('v')!r} is not supported; this daemon speaks {VERSION}", rid)
    type_ = obj.get("type")
    if type_ not in REQUEST_TYPES:
        raise ProtocolError("unknown_type", f"unknown request type {type_!r}; expected one of {', '.join(REQUEST_TYPES)}", rid)
    if type_ == "ask":
        _check_ask(obj, rid)
    elif type_ == "memory":
        _check_memory(obj, rid)
    elif type_ == "rate":
        if type(obj.get("score")) is not int or not 1 <= obj["score"] <= 5:
            raise ProtocolError("bad_request", "'rate' needs 'score': an integer from 1 to 5", rid)
        if obj.get("query_id") is not None and not isinstance(obj["query_id"], str):
            raise ProtocolError("bad_request", "'query_id' must be a string", rid)
    elif type_ == "hint":
        if not isinstance(obj.get("text"), str):
            raise ProtocolError("bad_request", "'hint' needs 'text': a string", rid)
        if obj.get("session") is not None and not (isinstance(obj["session"], str) and 0 < len(obj["session"]) <= 128):
            raise ProtocolError("bad_request", "'session' must be a name of 1..128 characters", rid)
        if not isinstance(obj.get("memory", True), bool):
            raise ProtocolError("bad_request", "'memory' must be true or false", rid)
    elif type_ == "jobs":
        if obj.get("op") not in ("list", "cancel"):
            raise ProtocolError("bad_request", "'jobs' needs 'op': list or cancel", rid)
        if obj["op"] == "cancel" and not (isinstance(obj.get("target"), str) and obj["target"]):
            raise ProtocolError("bad_request", "'cancel' needs 'target': a job id", rid)
    elif type_ == "train":
        if obj.get("op") not in TRAIN_OPS:
            raise ProtocolError("bad_request", f"'train' needs 'op', one of {', '.join(TRAIN_OPS)}", rid)
        if obj.get("model") is not None and not (isinstance(obj["model"], str) and obj["model"]):
            raise ProtocolError("bad_request", "'model' must be a model name", rid)
        if obj.get("version") is not None and not (type(obj["version"]) is int and obj["version"] > 0):
            raise ProtocolError("bad_request", "'version' must be a positive integer (an adapter version)", rid)
        if not isinstance(obj.get("wait", False), bool):
            raise ProtocolError("bad_request", "'wait' must be true or false", rid)
    elif type_ == "cache" and obj.get("op") not in ("list", "clear", "stats"):
        raise ProtocolError("bad_request", "'cache' needs 'op': list, clear or stats", rid)
    elif type_ == "models":
        if obj.get("op") not in MODEL_OPS:
            raise ProtocolError("bad_request", f"'models' needs 'op', one of {', '.join(MODEL_OPS)}", rid)
        if obj["op"] in ("load", "unload") and not (isinstance(obj.get("name"), str) and obj["name"]):
            raise ProtocolError("bad_request", f"'{obj['op']}' needs 'name': a model name", rid)
    elif type_ == "learn" and obj.get("op") not in ("stats", "reset"):
        raise ProtocolError("bad_request", "'learn' needs 'op': stats or reset", rid)
    elif type_ == "cancel" and not isinstance(obj.get("target"), str):
        raise ProtocolError("bad_request", "'cancel' needs 'target': the id of the ask to cancel", rid)
    return obj


def _check_ask(obj: dict[str, Any], rid: str) -> None:
    def bad(message: str) -> ProtocolError:
        return ProtocolError("bad_request", message, rid)

    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise bad("'ask' needs 'text': a non-empty string")
    stages = obj.get("stages")
    if stages is not None and (not isinstance(stages, list) or not stages or not all(isinstance(s, str) for s in stages)):
        raise bad("'stages' must be a non-empty list of stage names")
    if not isinstance(obj.get("memory", True), bool):
        raise bad("'memory' must be true or false")
    session = obj.get("session")
    if session is not None and (not isinstance(session, str) or not 0 < len(session) <= 128):
        raise bad("'session' must be a name of 1..128 characters")
    if not isinstance(obj.get("sequential", False), bool):
        raise bad("'sequential' must be true or false")
    chain = obj.get("chain")
    if chain is not None and (not isinstance(chain, str) or not chain):
        raise bad("'chain' must be a chain name")
    if chain is not None and (stages or obj.get("sequential")):
        raise bad("'chain' runs its own steps: it cannot be combined with 'stages' or 'sequential'")
    model = obj.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise bad("'model' must be a model name")
    if model is not None and (stages or chain or obj.get("sequential")):
        raise bad("'model' answers alone: it cannot be combined with 'stages', 'chain' or 'sequential'")
    history = obj.get("history")
    if history is not None and (not isinstance(history, list) or not all(
            isinstance(t, dict) and isinstance(t.get("question"), str) and isinstance(t.get("answer"), str) for t in history)):
        raise bad("'history' must be a list of maps with 'question' and 'answer' strings")
    if obj.get("system") is not None and not isinstance(obj["system"], str):
        raise bad("'system' must be a string")
    options = obj.get("options") or {}
    if not isinstance(options, dict):
        raise bad("'options' must be a map")
    max_tokens = options.get("max_tokens")
    if max_tokens is not None and (type(max_tokens) is not int or not 1 <= max_tokens <= 8192):
        raise bad("'options.max_tokens' must be an integer in 1..8192")
    temperature = options.get("temperature")
    if temperature is not None and (type(temperature) not in (int, float) or not 0 <= temperature <= 2):
        raise bad("'options.temperature' must be a number in 0..2")
    seed = options.get("seed")
    if seed is not None and (type(seed) is not int or not 0 <= seed < 2**32):
        raise bad("'options.seed' must be an integer in 0..2**32-1")


def _check_memory(obj: dict[str, Any], rid: str) -> None:
    op = obj.get("op")
    if op not in MEMORY_OPS:
        raise ProtocolError("bad_request", f"'memory' needs 'op', one of {', '.join(MEMORY_OPS)}", rid)
    if op == "search" and not (isinstance(obj.get("query"), str) and obj["query"].strip()):
        raise ProtocolError("bad_request", "'search' needs 'query': a non-empty string", rid)
    if op == "show" and not isinstance(obj.get("target"), str):
        raise ProtocolError("bad_request", "'show' needs 'target': a memory id", rid)
    if op == "forget" and not (isinstance(obj.get("target"), str) or (
            isinstance(obj.get("targets"), list) and all(isinstance(t, str) for t in obj["targets"]))):
        raise ProtocolError("bad_request", "'forget' needs 'target': a memory id, or 'targets': a list of them", rid)
    if op == "import":
        records = obj.get("records")
        if not isinstance(records, list):
            raise ProtocolError("bad_request", "'import' needs 'records': a list of memories", rid)
        for number, record in enumerate(records, 1):
            problem = memory_record_problem(record)
            if problem:
                raise ProtocolError("bad_request", f"'import' record {number}: {problem}", rid)
    limit = obj.get("limit")
    if limit is not None and (type(limit) is not int or limit < 0):
        raise ProtocolError("bad_request", "'limit' must be a non-negative integer", rid)


def memory_record_problem(record: Any) -> str | None:
    """What is wrong with one memory to import (as ``memory export`` writes them), or None."""
    if not isinstance(record, dict):
        return "a memory must be a map (a JSON object)"
    missing = [k for k in ("id", "question", "answer") if not isinstance(record.get(k), str)]
    if missing:
        return f"a memory needs id, question and answer as strings ({', '.join(missing)} missing or not a string)"
    if not 0 < len(record["id"]) <= MAX_ID_CHARS:
        return f"its id must have 1..{MAX_ID_CHARS} characters"
    if record.get("ts") is not None and (type(record["ts"]) not in (int, float)):
        return "'ts' must be a number (seconds since 1970)"
    for key in ("route", "session"):
        if record.get(key) is not None and not isinstance(record[key], str):
            return f"'{key}' must be a string"
    rating = record.get("rating")
    if rating is not None and not (type(rating) is int and 0 <= rating <= 5):
        return "'rating' must be an integer from 1 to 5 (0: not rated)"
    models = record.get("models")
    if models is not None and not (isinstance(models, str) or (isinstance(models, list) and all(isinstance(m, str) for m in models))):
        return "'models' must be a string or a list of strings"
    return None
