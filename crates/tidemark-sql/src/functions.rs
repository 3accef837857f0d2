//! Which function calls write: the catalog of function volatilities loaded from the primary
//! (`FunctionCatalog`), the operator's overrides (`FunctionPolicy`), the built-in lists of
//! known-writing and known-reading functions, and the decision that combines them
//! (`FunctionRules::effect`).

use std::collections::{HashMap, HashSet};

/// `pg_proc.provolatile`: how a function may behave.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Volatility {
    /// `i`: same result for the same arguments, no side effects.
    Immutable,
    /// `s`: same result within one statement, no side effects.
    Stable,
    /// `v`: may change anything, including the database.
    Volatile,
}

impl Volatility {
    /// Parses `pg_proc.provolatile` (`"i"`, `"s"`, `"v"`); anything else is `None`.
    pub fn from_provolatile(s: &str) -> Option<Volatility> {
        match s.trim() {
            "i" => Some(Volatility::Immutable),
            "s" => Some(Volatility::Stable),
            "v" => Some(Volatility::Volatile),
            _ => None,
        }
    }
}

/// Function volatilities read from the primary's `pg_proc`, keyed by lowercase unqualified name
/// and by `schema.name`. When several functions share a key (overloads, or the same name in
/// several schemas) the most volatile one wins: the classification only ever errs towards
/// "write", which sends the statement to the primary.
#[derive(Clone, Debug, Default)]
pub struct FunctionCatalog {
    by_name: HashMap<String, Volatility>,
    functions: usize,
}

impl FunctionCatalog {
    /// The query the proxy runs on the primary to fill the catalog. Its rows are
    /// `(nspname text, proname text, provolatile text)`; feed each to [`FunctionCatalog::insert`]
    /// with [`Volatility::from_provolatile`].
    ///
    /// An aggregate's own `provolatile` means nothing (`CREATE AGGREGATE` always records
    /// immutable); what it does is what its support functions do, so an aggregate gets the most
    /// volatile of its own and their volatilities (`'i' < 's' < 'v'`).
    pub const LOAD_SQL: &'static str = "SELECT n.nspname::text, p.proname::text, \
         CASE WHEN p.prokind = 'a' THEN \
           (SELECT max(f.provolatile::text) FROM pg_catalog.pg_aggregate a \
            JOIN pg_catalog.pg_proc f ON f.oid IN (a.aggfnoid, a.aggtransfn, a.aggfinalfn, \
              a.aggcombinefn, a.aggserialfn, a.aggdeserialfn, a.aggmtransfn, a.aggminvtransfn, \
              a.aggmfinalfn) \
            WHERE a.aggfnoid = p.oid) \
         ELSE p.provolatile::text END \
         FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace";

    /// An empty catalog (the state before the first load).
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one `pg_proc` row. Names are matched case-insensitively.
    pub fn insert(&mut self, schema: &str, name: &str, v: Volatility) {
        let name = name.to_lowercase();
        let schema = schema.to_lowercase();
        let mut put = |key: String| {
            self.by_name
                .entry(key)
                .and_modify(|old| *old = (*old).max(v))
                .or_insert(v);
        };
        put(format!("{schema}.{name}"));
        put(name);
        self.functions += 1;
    }

    /// Number of rows inserted.
    pub fn len(&self) -> usize {
        self.functions
    }

    /// True before anything was inserted, i.e. the catalog has not been loaded.
    pub fn is_empty(&self) -> bool {
        self.functions == 0
    }

    /// The volatility of `schema.name` (or of any function called `name` when `schema` is empty).
    pub fn lookup(&self, schema: &str, name: &str) -> Option<Volatility> {
        if schema.is_empty() {
            self.by_name.get(name).copied()
        } else {
            self.by_name.get(&format!("{schema}.{name}")).copied()
        }
    }
}

/// The operator's overrides from the config file. Names may be schema-qualified
/// (`billing.charge`) or bare (`charge`, which matches the function in any schema).
/// `write_functions` wins over `read_only_functions` when a name is in both.
#[derive(Clone, Debug, Default)]
pub struct FunctionPolicy {
    /// Functions that write (their callers go to the primary) even if declared STABLE/IMMUTABLE.
    pub write_functions: Vec<String>,
    /// VOLATILE functions that only read (their callers may go to a replica).
    pub read_only_functions: Vec<String>,
}

/// What calling a function means for routing.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Effect {
    pub writes: bool,
    /// Session-level advisory locks: the lock lives in one server session.
    pub pins_session: bool,
}

/// Built-in functions that write, change server state, assign a transaction id, or only work on a
/// primary (they fail during recovery). Checked before the catalog (several are STABLE or IMMUTABLE
/// in `pg_proc`, e.g. `txid_current`, `pg_walfile_name`).
const WRITING_BUILTINS: &[&str] = &[
    "nextval",
    "setval",
    "pg_notify",
    "txid_current",
    "pg_current_xact_id",
    "set_config",
    "setseed",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_switch_wal",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_drop_replication_slot",
    "pg_replication_slot_advance",
    "pg_copy_physical_replication_slot",
    "pg_copy_logical_replication_slot",
    "pg_logical_slot_get_changes",
    "pg_logical_slot_get_binary_changes",
    "pg_logical_emit_message",
    "pg_create_restore_point",
    "pg_promote",
    "pg_wal_replay_pause",
    "pg_wal_replay_resume",
    "pg_stat_reset",
    "pg_stat_reset_shared",
    "pg_stat_reset_single_table_counters",
    "pg_stat_reset_single_function_counters",
    "pg_stat_reset_slru",
    "pg_stat_reset_replication_slot",
    "pg_stat_reset_subscription_stats",
    "pg_import_system_collations",
    "pg_backup_start",
    "pg_backup_stop",
    "dblink_exec",
    "dblink_connect",
    "dblink_connect_u",
    "dblink_send_query",
    "pg_file_write",
    "pg_file_rename",
    "pg_file_unlink",
    "pg_prewarm",
    // Primary-only: "recovery is in progress" on a hot standby.
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_flush_lsn",
    "pg_walfile_name",
    "pg_walfile_name_offset",
];

/// Name prefixes of built-in writing function families: all advisory lock functions (session
/// and transaction level, lock and unlock), large objects, slot creation.
const WRITING_PREFIXES: &[&str] = &["pg_advisory_", "pg_try_advisory_", "lo_", "pg_create_"];

/// Large-object functions without the `lo_` prefix.
const LARGE_OBJECT_WRITERS: &[&str] = &["lowrite", "loread", "lo_open"];

/// VOLATILE in `pg_proc` but they only read (or have effects local to the statement).
const VOLATILE_READ_ONLY: &[&str] = &[
    "random",
    "random_normal",
    "clock_timestamp",
    "statement_timestamp",
    "timeofday",
    "gen_random_uuid",
    "uuidv4",
    "uuidv7",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "txid_current_snapshot",
    "pg_current_snapshot",
    "txid_current_if_assigned",
    "pg_current_xact_id_if_assigned",
    "pg_last_wal_replay_lsn",
    "pg_last_wal_receive_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_is_in_recovery",
    "pg_is_wal_replay_paused",
    "pg_get_wal_replay_pause_state",
    "pg_stat_get_activity",
    "pg_stat_get_backend_idset",
    "pg_stat_clear_snapshot",
    "pg_stat_force_next_flush",
    "pg_ls_dir",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_stat_file",
    "pg_ls_logdir",
    "pg_ls_waldir",
    "pg_ls_tmpdir",
    "pg_ls_archive_statusdir",
    "pg_get_keywords",
    "pg_lock_status",
    "pg_blocking_pids",
    "pg_safe_snapshot_blocking_pids",
    "pg_postmaster_start_time",
    "pg_conf_load_time",
    "pg_tablespace_databases",
    "pg_stat_get_wal_receiver",
    "pg_stat_get_wal_senders",
    "pg_get_replication_slots",
    "pg_show_all_settings",
    "pg_backend_memory_contexts",
    "pg_get_backend_memory_contexts",
    "inet_client_addr",
    "inet_client_port",
    "inet_server_addr",
    "inet_server_port",
    "pg_trigger_depth",
];

/// Common functions assumed read-only while the catalog is not loaded yet. Anything else with an
/// empty catalog is treated as a write (the safe choice).
const COMMON_READ: &[&str] = &[
    // aggregates
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "array_agg",
    "string_agg",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "bool_and",
    "bool_or",
    "every",
    "bit_and",
    "bit_or",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "corr",
    "covar_pop",
    "covar_samp",
    "regr_slope",
    "grouping",
    // window functions
    "row_number",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "ntile",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "nth_value",
    // time
    "now",
    "current_timestamp",
    "current_date",
    "current_time",
    "localtimestamp",
    "localtime",
    "transaction_timestamp",
    "statement_timestamp",
    "clock_timestamp",
    "timeofday",
    "date_trunc",
    "date_part",
    "date_bin",
    "extract",
    "age",
    "to_timestamp",
    "to_date",
    "to_char",
    "to_number",
    "make_date",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "make_interval",
    "justify_days",
    "justify_hours",
    "justify_interval",
    "isfinite",
    "timezone",
    "overlaps",
    // strings
    "lower",
    "upper",
    "initcap",
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "bit_length",
    "substr",
    "substring",
    "concat",
    "concat_ws",
    "format",
    "replace",
    "split_part",
    "trim",
    "btrim",
    "ltrim",
    "rtrim",
    "lpad",
    "rpad",
    "position",
    "strpos",
    "left",
    "right",
    "repeat",
    "reverse",
    "translate",
    "overlay",
    "starts_with",
    "md5",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "encode",
    "decode",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "regexp_replace",
    "regexp_match",
    "regexp_matches",
    "regexp_split_to_array",
    "regexp_split_to_table",
    "regexp_like",
    "regexp_count",
    "regexp_substr",
    "string_to_array",
    "string_to_table",
    "array_to_string",
    "ascii",
    "chr",
    "to_hex",
    "convert_from",
    "convert_to",
    "normalize",
    "is_normalized",
    "unistr",
    "like_escape",
    "similar_to_escape",
    "similar_escape",
    // null handling / comparison
    "coalesce",
    "nullif",
    "greatest",
    "least",
    "num_nulls",
    "num_nonnulls",
    // math
    "abs",
    "round",
    "trunc",
    "ceil",
    "ceiling",
    "floor",
    "sign",
    "mod",
    "power",
    "pow",
    "sqrt",
    "cbrt",
    "exp",
    "ln",
    "log",
    "log10",
    "div",
    "gcd",
    "lcm",
    "width_bucket",
    "random",
    "random_normal",
    "pi",
    "degrees",
    "radians",
    "sin",
    "cos",
    "tan",
    "atan",
    "atan2",
    // arrays / sets
    "generate_series",
    "generate_subscripts",
    "unnest",
    "array_length",
    "array_lower",
    "array_upper",
    "array_ndims",
    "array_dims",
    "array_position",
    "array_positions",
    "array_append",
    "array_prepend",
    "array_cat",
    "array_remove",
    "array_replace",
    "cardinality",
    // json
    "json_build_object",
    "jsonb_build_object",
    "json_build_array",
    "jsonb_build_array",
    "json_object",
    "jsonb_object",
    "to_json",
    "to_jsonb",
    "row_to_json",
    "array_to_json",
    "json_extract_path",
    "jsonb_extract_path",
    "json_extract_path_text",
    "jsonb_extract_path_text",
    "json_array_elements",
    "jsonb_array_elements",
    "json_array_elements_text",
    "jsonb_array_elements_text",
    "json_array_length",
    "jsonb_array_length",
    "json_each",
    "jsonb_each",
    "json_each_text",
    "jsonb_each_text",
    "json_object_keys",
    "jsonb_object_keys",
    "json_typeof",
    "jsonb_typeof",
    "jsonb_set",
    "jsonb_insert",
    "jsonb_pretty",
    "jsonb_strip_nulls",
    "json_strip_nulls",
    "jsonb_path_query",
    "jsonb_path_query_array",
    "jsonb_path_query_first",
    "jsonb_path_exists",
    "jsonb_path_match",
    "json_populate_record",
    "jsonb_populate_record",
    "json_to_record",
    "jsonb_to_record",
    "json_to_recordset",
    "jsonb_to_recordset",
    // system information
    "version",
    "current_setting",
    "current_database",
    "current_catalog",
    "current_schema",
    "current_schemas",
    "current_user",
    "current_role",
    "session_user",
    "system_user",
    "user",
    "pg_backend_pid",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "pg_typeof",
    "pg_collation_for",
    "pg_is_in_recovery",
    "pg_last_wal_replay_lsn",
    "pg_last_wal_receive_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_postmaster_start_time",
    "pg_size_pretty",
    "pg_size_bytes",
    "pg_relation_size",
    "pg_total_relation_size",
    "pg_table_size",
    "pg_indexes_size",
    "pg_database_size",
    "pg_column_size",
    "pg_get_viewdef",
    "pg_get_indexdef",
    "pg_get_constraintdef",
    "pg_get_functiondef",
    "pg_get_expr",
    "pg_get_userbyid",
    "pg_get_serial_sequence",
    "pg_table_is_visible",
    "pg_type_is_visible",
    "pg_function_is_visible",
    "has_table_privilege",
    "has_schema_privilege",
    "has_database_privilege",
    "has_column_privilege",
    "has_function_privilege",
    "pg_has_role",
    "obj_description",
    "col_description",
    "format_type",
    "to_regclass",
    "to_regtype",
    "to_regproc",
    "txid_current_snapshot",
    "pg_current_snapshot",
    "gen_random_uuid",
    "uuid_generate_v4",
    "inet_client_addr",
    "inet_server_addr",
    "inet_server_port",
    // text search
    "to_tsvector",
    "to_tsquery",
    "plainto_tsquery",
    "phraseto_tsquery",
    "websearch_to_tsquery",
    "ts_rank",
    "ts_rank_cd",
    "ts_headline",
];

/// Everything a classification needs to judge a function call: built-in lists, the operator's
/// policy (lowercased) and the loaded catalog.
#[derive(Debug)]
pub(crate) struct FunctionRules {
    policy_write: HashSet<String>,
    policy_read: HashSet<String>,
    writing: HashSet<&'static str>,
    volatile_read_only: HashSet<&'static str>,
    common_read: HashSet<&'static str>,
    catalog: FunctionCatalog,
}

impl FunctionRules {
    pub(crate) fn new(policy: &FunctionPolicy, catalog: FunctionCatalog) -> Self {
        let lower = |v: &[String]| v.iter().map(|s| s.trim().to_lowercase()).collect();
        FunctionRules {
            policy_write: lower(&policy.write_functions),
            policy_read: lower(&policy.read_only_functions),
            writing: WRITING_BUILTINS
                .iter()
                .chain(LARGE_OBJECT_WRITERS)
                .copied()
                .collect(),
            volatile_read_only: VOLATILE_READ_ONLY.iter().copied().collect(),
            common_read: COMMON_READ.iter().copied().collect(),
            catalog,
        }
    }

    fn in_policy(set: &HashSet<String>, schema: &str, name: &str) -> bool {
        set.contains(name) || (!schema.is_empty() && set.contains(&format!("{schema}.{name}")))
    }

    /// True for a built-in function tidemark knows the session effects of (all of them are
    /// tracked or pin: `set_config`, advisory locks): unqualified or `pg_catalog` names in the
    /// built-in lists, or that the catalog knows in `pg_catalog`. A user's function may change
    /// session state in ways tidemark cannot see.
    pub(crate) fn is_known_builtin(&self, schema: &str, name: &str) -> bool {
        let builtin = schema.is_empty() || schema == "pg_catalog";
        if !builtin {
            return false;
        }
        if name.starts_with("pg_advisory_")
            || name.starts_with("pg_try_advisory_")
            || self.writing.contains(name)
            || WRITING_PREFIXES.iter().any(|p| name.starts_with(p))
            || self.volatile_read_only.contains(name)
            || self.common_read.contains(name)
        {
            return true;
        }
        self.catalog
            .by_name
            .contains_key(&format!("pg_catalog.{name}"))
    }

    /// True when calling `schema.name` may change session state tidemark cannot follow: a
    /// function that is not a known built-in and that the catalog does not know as STABLE or
    /// IMMUTABLE (those must not have side effects).
    pub(crate) fn may_change_session(&self, schema: &str, name: &str) -> bool {
        if self.is_known_builtin(schema, name) {
            return false;
        }
        !matches!(
            self.catalog.lookup(schema, name),
            Some(Volatility::Stable | Volatility::Immutable)
        )
    }

    /// The effect of calling `schema.name` (schema empty when unqualified). Both lowercase.
    ///
    /// Order: policy write list, policy read list, built-in writers (only for unqualified or
    /// `pg_catalog` names), then the catalog (VOLATILE → write unless a known read-only
    /// built-in), or without a catalog the list of common read functions; anything else writes.
    pub(crate) fn effect(&self, schema: &str, name: &str) -> Effect {
        let write = Effect {
            writes: true,
            pins_session: false,
        };
        let read = Effect {
            writes: false,
            pins_session: false,
        };
        if Self::in_policy(&self.policy_write, schema, name) {
            return write;
        }
        if Self::in_policy(&self.policy_read, schema, name) {
            return read;
        }
        let builtin = schema.is_empty() || schema == "pg_catalog";
        if builtin {
            let advisory = name.starts_with("pg_advisory_") || name.starts_with("pg_try_advisory_");
            if advisory {
                return Effect {
                    writes: true,
                    pins_session: !name.contains("_xact_"),
                };
            }
            if self.writing.contains(name) || WRITING_PREFIXES.iter().any(|p| name.starts_with(p)) {
                return write;
            }
        }
        if !self.catalog.is_empty() {
            return match self.catalog.lookup(schema, name) {
                Some(Volatility::Volatile) => {
                    if builtin && self.volatile_read_only.contains(name) {
                        read
                    } else {
                        write
                    }
                }
                Some(_) => read,
                None => write,
            };
        }
        if builtin && (self.common_read.contains(name) || self.volatile_read_only.contains(name)) {
            read
        } else {
            write
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(catalog: FunctionCatalog) -> FunctionRules {
        FunctionRules::new(&FunctionPolicy::default(), catalog)
    }

    #[test]
    fn catalog_merges_most_volatile() {
        let mut c = FunctionCatalog::new();
        assert!(c.is_empty());
        c.insert("public", "f", Volatility::Stable);
        c.insert("other", "F", Volatility::Volatile);
        assert_eq!(c.len(), 2);
        assert_eq!(c.lookup("", "f"), Some(Volatility::Volatile));
        assert_eq!(c.lookup("public", "f"), Some(Volatility::Stable));
        assert_eq!(c.lookup("nope", "f"), None);
    }

    #[test]
    fn provolatile_parses() {
        assert_eq!(
            Volatility::from_provolatile("v"),
            Some(Volatility::Volatile)
        );
        assert_eq!(Volatility::from_provolatile("s"), Some(Volatility::Stable));
        assert_eq!(
            Volatility::from_provolatile("i"),
            Some(Volatility::Immutable)
        );
        assert_eq!(Volatility::from_provolatile("x"), None);
    }

    #[test]
    fn advisory_locks_pin_only_session_level() {
        let r = rules(FunctionCatalog::new());
        assert!(r.effect("", "pg_advisory_lock").pins_session);
        assert!(
            r.effect("pg_catalog", "pg_try_advisory_lock_shared")
                .pins_session
        );
        let x = r.effect("", "pg_advisory_xact_lock");
        assert!(x.writes && !x.pins_session);
    }

    #[test]
    fn unknown_function_without_catalog_writes() {
        let r = rules(FunctionCatalog::new());
        assert!(r.effect("", "my_func").writes);
        assert!(!r.effect("", "count").writes);
        assert!(r.effect("myschema", "count").writes);
    }

    #[test]
    fn catalog_decides_when_loaded() {
        let mut c = FunctionCatalog::new();
        c.insert("pg_catalog", "random", Volatility::Volatile);
        c.insert("public", "v", Volatility::Volatile);
        c.insert("public", "s", Volatility::Stable);
        let r = rules(c);
        assert!(!r.effect("", "random").writes);
        assert!(r.effect("", "v").writes);
        assert!(!r.effect("public", "s").writes);
        // Loaded catalog, not found: write.
        assert!(r.effect("", "count").writes);
    }
}
