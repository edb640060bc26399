"""The session engine: turn orchestration, with no storage format and no model inside.

``_sync`` (ConversationSession) and ``_aio`` (AsyncConversationSession) are the drivers: they
hold no turn logic. ``_core`` holds one session's collaborators (backend, store, memory, KV
file) and its non-turn operations; ``_turn`` the Turn/AsyncTurn over one set of turn steps;
``_conversation`` the conversation itself (no threads, no I/O).
"""
