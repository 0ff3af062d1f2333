"""The tables both backends define alike, written once; each backend's migrations name them.

A migration text names a shared part as ``{first}``, ``{outbox}``, ...; :func:`migrations` puts in the
definition and then the backend's words (``_DDL`` in each backend): column types (``{text}``,
``{time}``, ...) and the columns PostgreSQL's first schema has that SQLite added by a later
migration (``{threads_later}``, ...). The texts come out byte for byte as they were first
released, so a database created before this module and one created after it have the same schema.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

SHARED: Mapping[str, str] = {
    # Idempotency keys, customers and their identities, per-tenant thread numbers, threads.
    "first": """CREATE TABLE idempotency_keys (
        key {text} PRIMARY KEY,
        message_id {text} NOT NULL,
        thread_id {text},
        customer_id {text},
        sequence {int},
        is_new_thread {bool},{idempotency_keys_later}
        created_at {time} NOT NULL
    ){without_rowid};
    CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

    CREATE TABLE customers (
        id {text} PRIMARY KEY,
        tenant {text} NOT NULL,
        display_name {text},{customers_later}
        created_at {time} NOT NULL
    );
    CREATE TABLE identities (
        tenant {text} NOT NULL,
        kind {text} NOT NULL,
        value {text} NOT NULL,
        customer_id {text} NOT NULL REFERENCES customers (id),
        verified {bool} NOT NULL DEFAULT {false},
        created_at {time} NOT NULL,
        PRIMARY KEY (tenant, kind, value)
    );
    CREATE INDEX identities_customer ON identities (customer_id);

    CREATE TABLE tenant_counters (
        tenant {text} PRIMARY KEY,
        next_thread_number {bigint} NOT NULL
    );
    CREATE TABLE threads (
        id {text} PRIMARY KEY,
        tenant {text} NOT NULL,
        inbox {text} NOT NULL,
        customer_id {text} NOT NULL REFERENCES customers (id),
        subject {text},
        status {text} NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
        number {bigint} NOT NULL,
        last_activity {time} NOT NULL,
        next_sequence {int} NOT NULL DEFAULT 1,{threads_later}
        created_at {time} NOT NULL,
        UNIQUE (tenant, number)
    );
    CREATE INDEX threads_open_by_customer ON threads (customer_id, tenant, inbox, last_activity)
        WHERE status = 'open';""",
    "messages": """CREATE TABLE messages (
        message_id {text} PRIMARY KEY,
        thread_id {text} NOT NULL REFERENCES threads (id),
        customer_id {text} NOT NULL REFERENCES customers (id),
        sequence {int} NOT NULL,
        channel {text} NOT NULL,
        external_id {text},
        rfc822_message_id {text},
        received_at {time} NOT NULL,
        UNIQUE (thread_id, sequence)
    );
    CREATE INDEX messages_rfc822 ON messages (rfc822_message_id) WHERE rfc822_message_id IS NOT NULL;""",
    "outbox": """CREATE TABLE outbox (
        position {serial},
        event_id {text} NOT NULL UNIQUE,
        type {text} NOT NULL,
        routing_key {text} NOT NULL,
        tenant {text} NOT NULL,
        channel {text} NOT NULL,
        thread_id {text},
        sequence {int},
        body {blob} NOT NULL,
        created_at {time} NOT NULL,
        published_at {time}
    );
    CREATE INDEX outbox_unpublished ON outbox (position) WHERE published_at IS NULL;""",
    # Raw bodies kept inline, the index of blob files, quarantined envelopes, counters.
    "archive": """CREATE TABLE raw_archive (
        sha256 {text} PRIMARY KEY,
        data {blob} NOT NULL,
        created_at {time} NOT NULL
    );
    CREATE TABLE blob_files (
        sha256 {text} PRIMARY KEY,
        size {bigint} NOT NULL,
        created_at {time} NOT NULL
    );

    CREATE TABLE quarantine (
        id {text} PRIMARY KEY,
        tenant {text} NOT NULL,
        channel {text} NOT NULL,
        inbox {text} NOT NULL,
        reason {text} NOT NULL,
        raw_ref {text} NOT NULL,
        size {bigint} NOT NULL,
        received_at {time} NOT NULL,
        content_type {text},
        headers {text} NOT NULL,
        meta {text} NOT NULL,
        signature_verified {bool} NOT NULL,
        retry {int} NOT NULL,
        remote {text},
        created_at {time} NOT NULL,
        replayed_at {time},
        replay_result {text}
    );
    CREATE INDEX quarantine_created ON quarantine (created_at);

    CREATE TABLE counters (
        name {text} PRIMARY KEY,
        value {bigint} NOT NULL
    );""",
    "state": """CREATE TABLE state (
        key {text} PRIMARY KEY,
        value {blob} NOT NULL,
        updated_at {time} NOT NULL
    );""",
    "media": """CREATE TABLE media (
        key {text} PRIMARY KEY,
        channel {text} NOT NULL,
        inbox {text} NOT NULL,
        account {text} NOT NULL,
        ref {text} NOT NULL,
        kind {text} NOT NULL,
        state {text} NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'failed')),
        attempts {int} NOT NULL DEFAULT 0,
        next_attempt_at {time},
        sha256 {text},
        size {bigint},
        content_type {text},
        name {text},
        error {text},
        created_at {time} NOT NULL
    );""",
    "thread_keys": """CREATE TABLE thread_keys (
        tenant {text} NOT NULL,
        channel {text} NOT NULL,
        inbox {text} NOT NULL,
        key {text} NOT NULL,
        thread_id {text} NOT NULL REFERENCES threads (id),
        created_at {time} NOT NULL,
        PRIMARY KEY (tenant, channel, inbox, key)
    ){without_rowid};""",
    "claimed_links": """CREATE TABLE claimed_links (
        id {text} PRIMARY KEY,
        tenant {text} NOT NULL,
        customer_id {text} NOT NULL,
        other_customer_id {text} NOT NULL,
        identities {document} NOT NULL,
        message_id {text},
        created_at {time} NOT NULL
    );
    CREATE INDEX claimed_links_customer ON claimed_links (customer_id);
    CREATE INDEX claimed_links_other ON claimed_links (other_customer_id);""",
    # Blob files keep the content type they were stored with, so /blobs serves it.
    "blob_content_type": "ALTER TABLE blob_files ADD COLUMN content_type {text};",
    # The way back (gateway.replies): what each stored customer message says about answering it
    # (channel, inbox, identities, the normalizer's extra), the reply commands of desks with their
    # state, and the delivery reports of providers. Rows name their thread and customer, so erasing
    # a customer can find them.
    "replies": """CREATE TABLE reply_routes (
        message_id {text} PRIMARY KEY,
        tenant {text} NOT NULL,
        thread_id {text} NOT NULL,
        customer_id {text} NOT NULL,
        channel {text} NOT NULL,
        inbox {text} NOT NULL,
        external_id {text},
        identities {document} NOT NULL,
        extra {document} NOT NULL,
        received_at {time} NOT NULL
    );
    CREATE INDEX reply_routes_thread ON reply_routes (thread_id, received_at);
    CREATE INDEX reply_routes_customer ON reply_routes (customer_id);

    CREATE TABLE replies (
        id {text} PRIMARY KEY,
        tenant {text} NOT NULL,
        command_id {text} NOT NULL,
        fingerprint {text} NOT NULL,
        thread_id {text} NOT NULL,
        customer_id {text} NOT NULL,
        position {bigint} NOT NULL,
        command {document} NOT NULL,
        requested_channel {text},
        channel {text},
        inbox {text},
        status {text} NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sending', 'sent', 'failed')),
        attempts {int} NOT NULL DEFAULT 0,
        next_attempt_at {time} NOT NULL,
        lease_owner {text},
        provider_message_id {text},
        reason {text},
        detail {text},
        created_at {time} NOT NULL,
        updated_at {time} NOT NULL,
        UNIQUE (tenant, command_id),
        UNIQUE (thread_id, position)
    );
    CREATE INDEX replies_due ON replies (next_attempt_at) WHERE status IN ('pending', 'sending');
    CREATE INDEX replies_customer ON replies (customer_id);
    CREATE INDEX replies_provider ON replies (channel, provider_message_id)
        WHERE provider_message_id IS NOT NULL;

    CREATE TABLE reply_reports (
        reply_id {text} NOT NULL REFERENCES replies (id),
        status {text} NOT NULL,
        at {time} NOT NULL,
        reason {text},
        detail {text},
        PRIMARY KEY (reply_id, status)
    );""",
    # Retention and erasure: what each message's raw body, attachments and media are (so an erasure
    # finds them, and knows when another customer's message still needs the same bytes), when a blob
    # file was last stored again (retention counts from then), erased customers, and the audit of
    # erasures (no personal data: who asked, when, counts, a digest of what was removed).
    "erasure": """CREATE TABLE message_content (
        message_id {text} NOT NULL,
        kind {text} NOT NULL CHECK (kind IN ('raw', 'blob', 'media')),
        ref {text} NOT NULL,
        PRIMARY KEY (message_id, kind, ref)
    ){without_rowid};
    CREATE INDEX message_content_ref ON message_content (ref);
    ALTER TABLE customers ADD COLUMN erased_at {time};
    CREATE INDEX customers_merged_into ON customers (merged_into) WHERE merged_into IS NOT NULL;
    ALTER TABLE blob_files ADD COLUMN used_at {time};
    CREATE INDEX blob_files_age ON blob_files ((coalesce(used_at, created_at)));
    CREATE TABLE erasures (
        id {text} PRIMARY KEY,
        tenant {text} NOT NULL,
        customer_id {text} NOT NULL,
        requested_by {text},
        requested_at {time} NOT NULL,
        counts {document} NOT NULL,
        digest {text} NOT NULL
    );
    CREATE INDEX erasures_customer ON erasures (customer_id);""",
    # Messages stored before the reply ledger get their reply routes from what the messages table
    # and the thread know (no identities or extra: the dispatcher then answers to the customer's
    # identities), so a desk can answer threads that began before the upgrade.
    "reply_routes_backfill": """INSERT INTO reply_routes (message_id, tenant, thread_id, customer_id, channel,
        inbox, external_id, identities, extra, received_at)
    SELECT m.message_id, t.tenant, m.thread_id, m.customer_id, m.channel, t.inbox, m.external_id,
        CAST('[]' AS {document}), CAST('{{}}' AS {document}), m.received_at
    FROM messages m JOIN threads t ON t.id = m.thread_id
    WHERE true
    ON CONFLICT (message_id) DO NOTHING;""",
}


def migrations(words: Mapping[str, str], texts: Sequence[str]) -> tuple[str, ...]:
    """The migration texts with the shared parts and then the backend's words put in."""
    return tuple(text.format_map(SHARED).format_map(words) for text in texts)
