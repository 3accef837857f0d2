/*
 * Driver scenarios for pgJDBC, run once against PostgreSQL directly and once through tidemark
 * by crates/tidemark/tests/drivers.rs, which compares the two JSON outputs.
 *
 * Usage: java -cp /usr/share/java/postgresql.jar Matrix.java JDBCURL SUFFIX
 *   e.g. java -cp /usr/share/java/postgresql.jar Matrix.java \
 *          'jdbc:postgresql://127.0.0.1:6432/postgres?user=postgres' direct1
 * (Debian: apt-get install -y openjdk-17-jdk-headless libpostgresql-jdbc-java)
 * SUFFIX keeps the two runs' tables apart. Prints one JSON object {scenario: result} (keys
 * sorted) and always exits 0. Every scenario uses its own connection and returns plain data
 * (rows, counts, SQLSTATEs, booleans); an error is recorded as {"error": SQLSTATE or exception
 * class}, a hang (15 s) as {"error": "timeout"}.
 */
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;

public class Matrix {
    static String URL;
    static String SUF;
    static final int TIMEOUT_S = 15;

    interface Scenario {
        Object run() throws Exception;
    }

    static Connection connect(Properties extra) throws SQLException {
        Properties p = new Properties();
        p.setProperty("connectTimeout", "5");
        if (extra != null) p.putAll(extra);
        return DriverManager.getConnection(URL, p);
    }

    static Connection connect() throws SQLException {
        return connect(null);
    }

    static Properties props(String... kv) {
        Properties p = new Properties();
        for (int i = 0; i + 1 < kv.length; i += 2) p.setProperty(kv[i], kv[i + 1]);
        return p;
    }

    static Map<String, Object> err(Throwable e) {
        while (e instanceof ExecutionException && e.getCause() != null) e = e.getCause();
        String code = null;
        if (e instanceof SQLException) {
            code = ((SQLException) e).getSQLState();
            SQLException next = ((SQLException) e).getNextException();
            if (code == null && next != null) code = next.getSQLState();
        }
        if (e instanceof TimeoutException) code = "timeout";
        if (code == null) code = e.getClass().getSimpleName();
        Map<String, Object> m = new TreeMap<>();
        m.put("error", code);
        return m;
    }

    static Object scalar(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery(sql)) {
            rs.next();
            return rs.getObject(1);
        }
    }

    static List<Object> row(ResultSet rs) throws SQLException {
        List<Object> r = new ArrayList<>();
        for (int i = 1; i <= rs.getMetaData().getColumnCount(); i++) r.add(rs.getObject(i));
        return r;
    }

    static Map<String, Object> map(Object... kv) {
        Map<String, Object> m = new TreeMap<>();
        for (int i = 0; i + 1 < kv.length; i += 2) m.put((String) kv[i], kv[i + 1]);
        return m;
    }

    static void exec(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement()) {
            s.execute(sql);
        }
    }

    // ---- scenarios ----

    static Object preparedDefaultThreshold() throws Exception {
        try (Connection c = connect();
             PreparedStatement ps = c.prepareStatement("select ?::int * 2, ?::text")) {
            List<Object> out = new ArrayList<>();
            for (int i = 0; i < 10; i++) {
                ps.setInt(1, i);
                ps.setString(2, "s" + i);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    out.add(row(rs));
                }
            }
            return out;
        }
    }

    static Object prepareThresholdOne() throws Exception {
        try (Connection c = connect(props("prepareThreshold", "1"));
             PreparedStatement ps = c.prepareStatement("select ?::int + 100")) {
            List<Object> out = new ArrayList<>();
            for (int i = 0; i < 6; i++) {
                ps.setInt(1, i);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    out.add(rs.getInt(1));
                }
            }
            return out;
        }
    }

    static Object batchInsert(String name, Properties p) throws Exception {
        String t = name + "_" + SUF;
        try (Connection c = connect(p)) {
            exec(c, "create table " + t + " (id int primary key, v text)");
            int[] counts;
            try (PreparedStatement ps = c.prepareStatement("insert into " + t + " values (?, ?)")) {
                for (int i = 0; i < 50; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "v" + i);
                    ps.addBatch();
                }
                counts = ps.executeBatch();
            }
            Set<Integer> distinct = new TreeSet<>();
            for (int n : counts) distinct.add(n);
            return map("count", scalar(c, "select count(*) from " + t),
                    "last", scalar(c, "select v from " + t + " where id = 49"),
                    "update_counts_len", counts.length,
                    "update_counts_distinct", distinct);
        }
    }

    static Object readOnlyTransaction() throws Exception {
        String t = "jro_" + SUF;
        try (Connection c = connect()) {
            exec(c, "create table " + t + " (id int)");
            exec(c, "insert into " + t + " values (1), (2), (3)");
            c.setReadOnly(true);
            c.setAutoCommit(false);
            Map<String, Object> out = new TreeMap<>();
            out.put("transaction_read_only", scalar(c, "show transaction_read_only"));
            out.put("count", scalar(c, "select count(*) from " + t));
            try {
                exec(c, "insert into " + t + " values (4)");
                out.put("write", "ok");
            } catch (SQLException e) {
                out.put("write", err(e));
            }
            c.rollback();
            c.setAutoCommit(true);
            c.setReadOnly(false);
            out.put("after", scalar(c, "select count(*) from " + t));
            return out;
        }
    }

    static Object transactionInsertThenRead() throws Exception {
        String t = "jtx_" + SUF;
        try (Connection c = connect()) {
            exec(c, "create table " + t + " (id int primary key, v text)");
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("insert into " + t + " values (?, ?)")) {
                ps.setInt(1, 1);
                ps.setString(2, "in-tx");
                ps.executeUpdate();
            }
            Object inside;
            try (PreparedStatement ps = c.prepareStatement("select v from " + t + " where id = ?")) {
                ps.setInt(1, 1);
                try (ResultSet rs = ps.executeQuery()) {
                    inside = rs.next() ? rs.getString(1) : null;
                }
            }
            c.commit();
            Object afterCommit = scalar(c, "select v from " + t + " where id = 1");
            c.commit();
            c.setAutoCommit(true);
            Object autocommit = scalar(c, "select count(*) from " + t);
            return map("inside", inside, "after_commit", afterCommit, "autocommit_count", autocommit);
        }
    }

    static Object errors() throws Exception {
        Map<String, Object> out = new TreeMap<>();
        try (Connection c = connect()) {
            String[][] cases = {{"division_by_zero", "select 1/0"},
                    {"undefined_table", "select * from no_such_table_jdbc"},
                    {"syntax_error", "selec 1"}};
            for (String[] cs : cases) {
                try {
                    scalar(c, cs[1]);
                    out.put(cs[0], "ok");
                } catch (SQLException e) {
                    out.put(cs[0], err(e));
                }
            }
            try (PreparedStatement ps = c.prepareStatement("select ?::int / 0")) {
                ps.setInt(1, 1);
                ps.executeQuery().close();
                out.put("prepared_division_by_zero", "ok");
            } catch (SQLException e) {
                out.put("prepared_division_by_zero", err(e));
            }
            out.put("still_works", scalar(c, "select 1"));
        }
        return out;
    }

    static Object readYourWrites() throws Exception {
        String t = "jryw_" + SUF;
        try (Connection c = connect()) {
            exec(c, "create table " + t + " (id int primary key, v int)");
            List<Object> seen = new ArrayList<>();
            try (PreparedStatement ins = c.prepareStatement("insert into " + t + " values (?, ?)");
                 PreparedStatement sel = c.prepareStatement("select v from " + t + " where id = ?")) {
                for (int i = 0; i < 20; i++) {
                    ins.setInt(1, i);
                    ins.setInt(2, i * 10);
                    ins.executeUpdate();
                    sel.setInt(1, i);
                    try (ResultSet rs = sel.executeQuery()) {
                        seen.add(rs.next() ? rs.getObject(1) : null);
                    }
                }
            }
            return seen;
        }
    }

    static Object applicationName() throws Exception {
        try (Connection c = connect(props("ApplicationName", "jm"))) {
            return map("current_setting", scalar(c, "select current_setting('application_name')"),
                    "client_info", c.getClientInfo("ApplicationName"));
        }
    }

    // ---- JSON ----

    static void json(StringBuilder sb, Object o) {
        if (o == null) {
            sb.append("null");
        } else if (o instanceof Boolean || o instanceof Integer || o instanceof Long
                || o instanceof Short) {
            sb.append(o);
        } else if (o instanceof Number) {
            double d = ((Number) o).doubleValue();
            if (Double.isFinite(d)) sb.append(o); else str(sb, o.toString());
        } else if (o instanceof Map) {
            sb.append('{');
            boolean first = true;
            for (Map.Entry<?, ?> e : new TreeMap<>((Map<?, ?>) o).entrySet()) {
                if (!first) sb.append(", ");
                first = false;
                str(sb, String.valueOf(e.getKey()));
                sb.append(": ");
                json(sb, e.getValue());
            }
            sb.append('}');
        } else if (o instanceof Collection) {
            sb.append('[');
            boolean first = true;
            for (Object x : (Collection<?>) o) {
                if (!first) sb.append(", ");
                first = false;
                json(sb, x);
            }
            sb.append(']');
        } else {
            str(sb, o.toString());
        }
    }

    static void str(StringBuilder sb, String s) {
        sb.append('"');
        for (int i = 0; i < s.length(); i++) {
            char ch = s.charAt(i);
            switch (ch) {
                case '"': sb.append("\\\""); break;
                case '\\': sb.append("\\\\"); break;
                case '\n': sb.append("\\n"); break;
                case '\r': sb.append("\\r"); break;
                case '\t': sb.append("\\t"); break;
                case '\b': sb.append("\\b"); break;
                case '\f': sb.append("\\f"); break;
                default:
                    if (ch < 0x20) sb.append(String.format("\\u%04x", (int) ch));
                    else sb.append(ch);
            }
        }
        sb.append('"');
    }

    public static void main(String[] args) {
        Map<String, Object> results = new TreeMap<>();
        try {
            URL = args[0];
            SUF = args[1];
            DriverManager.setLoginTimeout(5);
            Map<String, Scenario> sc = new LinkedHashMap<>();
            sc.put("prepared_default_threshold", Matrix::preparedDefaultThreshold);
            sc.put("prepare_threshold_one", Matrix::prepareThresholdOne);
            sc.put("execute_batch", () -> batchInsert("jbatch", null));
            sc.put("execute_batch_rewrite", () -> batchInsert("jrewrite", props("reWriteBatchedInserts", "true")));
            sc.put("read_only_transaction", Matrix::readOnlyTransaction);
            sc.put("transaction_insert_then_read", Matrix::transactionInsertThenRead);
            sc.put("errors", Matrix::errors);
            sc.put("read_your_writes", Matrix::readYourWrites);
            sc.put("application_name", Matrix::applicationName);

            ExecutorService pool = Executors.newCachedThreadPool(r -> {
                Thread th = new Thread(r);
                th.setDaemon(true);
                return th;
            });
            for (Map.Entry<String, Scenario> e : sc.entrySet()) {
                Future<Object> f = pool.submit(e.getValue()::run);
                Object r;
                try {
                    r = f.get(TIMEOUT_S, TimeUnit.SECONDS);
                } catch (TimeoutException te) {
                    f.cancel(true);
                    r = err(te);
                } catch (Throwable t) {
                    r = err(t);
                }
                results.put(e.getKey(), r);
            }
        } catch (Throwable t) {
            results.put("main", err(t));
        }
        StringBuilder sb = new StringBuilder();
        json(sb, results);
        System.out.println(sb);
        System.out.flush();
        System.exit(0);
    }
}
