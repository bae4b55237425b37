// Parses JDBC URLs with Hive JDBC's own parser (org.apache.hive.jdbc.Utils,
// hive-jdbc 2.3.10) and prints one JSON line per URL, for kyuubi-broker's
// connection-string tests.
import java.util.Map;
import org.apache.hive.jdbc.JdbcUriParseException;
import org.apache.hive.jdbc.Utils;
import org.apache.hive.jdbc.ZooKeeperHiveClientException;

public class ParseJdbcUrl {
  static String q(String s) {
    if (s == null) return "null";
    StringBuilder b = new StringBuilder("\"");
    for (char c : s.toCharArray()) {
      if (c == '"' || c == '\\') b.append('\\').append(c);
      else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
      else b.append(c);
    }
    return b.append('"').toString();
  }

  static String map(Map<String, String> m) {
    StringBuilder b = new StringBuilder("{");
    boolean first = true;
    for (Map.Entry<String, String> e : new java.util.TreeMap<>(m).entrySet()) {
      if (!first) b.append(',');
      first = false;
      b.append(q(e.getKey())).append(':').append(q(e.getValue()));
    }
    return b.append('}').toString();
  }

  public static void main(String[] args) {
    for (String url : args) {
      try {
        Utils.JdbcConnectionParams p = Utils.parseURL(url);
        System.out.println("{\"ok\":true,\"host\":" + q(p.getHost()) + ",\"port\":" + p.getPort()
            + ",\"db\":" + q(p.getDbName()) + ",\"session\":" + map(p.getSessionVars())
            + ",\"conf\":" + map(p.getHiveConfs()) + ",\"vars\":" + map(p.getHiveVars()) + "}");
      } catch (ZooKeeperHiveClientException e) {
        // the grammar was accepted; only the discovery lookup failed
        System.out.println("{\"ok\":true,\"zookeeper_lookup_failed\":true}");
      } catch (JdbcUriParseException e) {
        System.out.println("{\"ok\":false,\"error\":" + q(e.getMessage()) + "}");
      } catch (Exception e) {
        System.out.println("{\"ok\":false,\"error\":" + q(e.toString()) + "}");
      }
    }
  }
}
