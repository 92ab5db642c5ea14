/*
 * A small stand-in for canal's `canal.deployer` module, for local tests only.
 *
 * Why it exists: the Maven Central mirror reachable from our machines serves the Canal
 * server modules (canal.server, canal.instance.*, canal.parse, ...) only up to 1.1.7 and the
 * deployer (CanalLauncher/CanalController) only up to 1.1.4, so the release's own launcher
 * cannot be had. Everything that matters to a client -- the TCP protocol, auth, sessions,
 * get/ack/rollback, the binlog parser, the memory store and the file meta manager -- lives in
 * canal.server and the modules under it, which we run unchanged. This class only does what
 * the deployer does for serverMode=tcp (no admin, no MQ, no auto-scan), standalone or in
 * cluster mode (canal.zkServers set):
 *
 *   1. read canal.properties from -Dcanal.conf (a file path or classpath:NAME); like canal,
 *      a JVM system property or an environment variable with the same key wins;
 *   2. create one CanalInstance per destination from the Spring XML named by
 *      canal.instance.global.spring.xml (canal's SpringCanalInstanceGenerator);
 *   3. register a ServerRunningMonitor per destination (the TCP session handler asks for
 *      one), which without ZooKeeper simply starts/stops the instance;
 *   4. start the embedded server, the instances and the Netty TCP server on canal.ip:canal.port,
 *      with canal.user / canal.passwd (hex SHA1(SHA1(pw))) as the client credentials;
 *   5. stop all of it on SIGTERM (a shutdown hook), which flushes the file meta (cursors).
 *
 * Cluster mode (canal.zkServers non-empty), as the deployer's CanalController does it:
 *   - one ZkClientx for the process (also handed to the instance's Spring XML through the
 *     static factory method zkClient(), for ZooKeeperMetaManager: cursors in ZooKeeper), with
 *     the session timeout canal.zookeeper.sessionTimeout (ms; our key, default 30000 = the
 *     ZkClient default the deployer gets);
 *   - persistent /otter/canal/destinations and /otter/canal/cluster, and this server's
 *     ephemeral /otter/canal/cluster/{ip:port};
 *   - each destination's ServerRunningMonitor gets the client: the server that creates the
 *     ephemeral /otter/canal/destinations/{dest}/running (JSON {"active":true,"address":"ip:port"})
 *     starts the instance and registers /otter/canal/destinations/{dest}/cluster/{ip:port};
 *     the others watch the node and try again canal.zookeeper.running.delay seconds (our key,
 *     default 5 = the monitor's own default) after it goes;
 *   - a standby server listens on its port too; a client that subscribes there is refused
 *     (the destination is not started here).
 *
 * Compiled by deploy/local/canal-ctl with plain javac against the jars in the lib directory.
 */
package local.canalconsumer;

import java.io.FileInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CountDownLatch;

import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.slf4j.MDC;

import org.I0Itec.zkclient.IZkStateListener;
import org.apache.zookeeper.CreateMode;
import org.apache.zookeeper.Watcher.Event.KeeperState;

import com.alibaba.otter.canal.common.zookeeper.ZkClientx;
import com.alibaba.otter.canal.common.zookeeper.ZookeeperPathUtils;
import com.alibaba.otter.canal.common.zookeeper.running.ServerRunningData;
import com.alibaba.otter.canal.common.zookeeper.running.ServerRunningListener;
import com.alibaba.otter.canal.common.zookeeper.running.ServerRunningMonitor;
import com.alibaba.otter.canal.common.zookeeper.running.ServerRunningMonitors;
import com.alibaba.otter.canal.instance.spring.SpringCanalInstanceGenerator;
import com.alibaba.otter.canal.server.embedded.CanalServerWithEmbedded;
import com.alibaba.otter.canal.server.exception.CanalServerException;
import com.alibaba.otter.canal.server.netty.CanalServerWithNetty;

public final class CanalLocalServer {

    private static final Logger LOG = LoggerFactory.getLogger(CanalLocalServer.class);

    /** The process's ZooKeeper client in cluster mode, null standalone. */
    private static volatile ZkClientx zk;

    private CanalLocalServer() {
    }

    /**
     * Factory method for the instance's Spring XML (spring/local-zk-instance.xml): the same
     * client the running monitors use, so one session holds the server's ephemeral nodes.
     */
    public static ZkClientx zkClient() {
        ZkClientx c = zk;
        if (c == null) {
            throw new IllegalStateException("canal.zkServers is not set: no ZooKeeper client for the instance");
        }
        return c;
    }

    /** Creates the ephemeral node PATH unless it exists (it may, after a session move). */
    static void ephemeral(ZkClientx c, String path) {
        try {
            c.createEphemeral(path);
        } catch (org.I0Itec.zkclient.exception.ZkNodeExistsException e) {
            // ours from this session already, or left by our previous session until it expires
        } catch (org.I0Itec.zkclient.exception.ZkNoNodeException e) {
            c.createPersistent(path.substring(0, path.lastIndexOf('/')), true);
            ephemeral(c, path);
        }
    }

    /** canal's own lookup order: system property, then environment variable, then the file. */
    static String setting(Properties file, String key, String fallback) {
        String v = System.getProperty(key);
        if (v == null) {
            v = System.getenv(key);
        }
        if (v == null) {
            v = file.getProperty(key);
        }
        v = v == null ? "" : v.trim();
        return v.isEmpty() ? fallback : v;
    }

    static Properties load(String location) throws IOException {
        Properties p = new Properties();
        if (location.startsWith("classpath:")) {
            String name = location.substring("classpath:".length());
            try (InputStream in = CanalLocalServer.class.getClassLoader().getResourceAsStream(name)) {
                if (in == null) {
                    throw new IOException("not on the classpath: " + name);
                }
                p.load(in);
            }
        } else {
            try (InputStream in = new FileInputStream(location)) {
                p.load(in);
            }
        }
        return p;
    }

    /** A map whose get() creates the monitor on first use, as ServerRunningMonitors expects. */
    static final class Monitors extends ConcurrentHashMap<String, ServerRunningMonitor> {

        private static final long serialVersionUID = 1L;
        private final transient ServerRunningData data;
        private final transient CanalServerWithEmbedded embedded;
        private final transient int delaySeconds;

        Monitors(ServerRunningData data, CanalServerWithEmbedded embedded, int delaySeconds) {
            this.data = data;
            this.embedded = embedded;
            this.delaySeconds = delaySeconds;
        }

        @Override
        public ServerRunningMonitor get(Object key) {
            final String destination = String.valueOf(key);
            return computeIfAbsent(destination, d -> {
                ServerRunningMonitor m = new ServerRunningMonitor(data);
                m.setDestination(d);
                final ZkClientx c = zk;
                final String clusterNode = ZookeeperPathUtils.getDestinationClusterNode(d, data.getAddress());
                if (c != null) {
                    m.setZkClient(c);
                    m.setDelayTime(delaySeconds);
                }
                m.setListener(new ServerRunningListener() {

                    public void processStart() {
                    }

                    public void processStop() {
                    }

                    public void processActiveEnter() {
                        MDC.put("destination", d);
                        try {
                            embedded.start(d);
                            if (c != null) {
                                ephemeral(c, clusterNode);
                                LOG.info("## destination {} runs here ({})", d, data.getAddress());
                            }
                        } finally {
                            MDC.remove("destination");
                        }
                    }

                    public void processActiveExit() {
                        MDC.put("destination", d);
                        try {
                            if (c != null) {
                                c.delete(clusterNode);
                                LOG.info("## destination {} no longer runs here", d);
                            }
                            embedded.stop(d);
                        } finally {
                            MDC.remove("destination");
                        }
                    }
                });
                m.init();
                return m;
            });
        }
    }

    public static void main(String[] args) throws Exception {
        String confLocation = System.getProperty("canal.conf", "classpath:canal.properties");
        Properties conf = load(confLocation);
        LOG.info("## canal local server: configuration {}", confLocation);

        String mode = setting(conf, "canal.serverMode", "tcp");
        if (!"tcp".equalsIgnoreCase(mode)) {
            throw new IllegalArgumentException("only canal.serverMode=tcp is supported here, got " + mode);
        }
        final String zkServers = setting(conf, "canal.zkServers", "");
        final String ip = setting(conf, "canal.ip", "127.0.0.1");
        final int port = Integer.parseInt(setting(conf, "canal.port", "11111"));
        final String springXml = setting(conf, "canal.instance.global.spring.xml", "");
        if (springXml.isEmpty()) {
            throw new IllegalArgumentException("canal.instance.global.spring.xml is not set");
        }
        final String user = setting(conf, "canal.user", "");
        final String passwd = setting(conf, "canal.passwd", "");
        if (!user.isEmpty() && passwd.isEmpty()) {
            // the real deployer refuses this combination too
            throw new IllegalArgumentException("canal.user is set but canal.passwd is empty");
        }
        final List<String> destinations = new ArrayList<>();
        for (String d : setting(conf, "canal.destinations", "").split(",")) {
            if (!d.trim().isEmpty()) {
                destinations.add(d.trim());
            }
        }
        final Set<String> known = ConcurrentHashMap.newKeySet();
        known.addAll(destinations);

        final CanalServerWithEmbedded embedded = CanalServerWithEmbedded.instance();
        embedded.setCanalInstanceGenerator(destination -> {
            if (!known.contains(destination)) {
                throw new CanalServerException("can't find destination:" + destination);
            }
            // Canal's parser sets canal.instance.tsdb.{url,dbUsername,dbPassword} as system
            // properties while it builds its table-meta history and then resets them to "";
            // the instance XML lets system properties override the files, so without this the
            // second destination's history would get the empty url and never start.
            System.clearProperty("canal.instance.tsdb.url");
            System.clearProperty("canal.instance.tsdb.dbUsername");
            System.clearProperty("canal.instance.tsdb.dbPassword");
            SpringCanalInstanceGenerator generator = new SpringCanalInstanceGenerator();
            generator.setSpringXml(springXml);
            return generator.generate(destination);
        });
        embedded.setMetricsPort(Integer.parseInt(setting(conf, "canal.metrics.pull.port", "0")));
        embedded.setUser(user);
        embedded.setPasswd(passwd);

        final String address = ip + ":" + port;
        if (!zkServers.isEmpty()) {
            int sessionMs = Integer.parseInt(setting(conf, "canal.zookeeper.sessionTimeout", "30000"));
            LOG.info("## cluster mode: ZooKeeper {} (session timeout {} ms)", zkServers, sessionMs);
            final ZkClientx c = new ZkClientx(zkServers, sessionMs, 30000);
            zk = c;
            c.createPersistent(ZookeeperPathUtils.DESTINATION_ROOT_NODE, true);
            c.createPersistent(ZookeeperPathUtils.CANAL_CLUSTER_ROOT_NODE, true);
            final String serverNode = ZookeeperPathUtils.getCanalClusterNode(address);
            ephemeral(c, serverNode);
            // a new session (the old one expired) lost every ephemeral node: register again;
            // the running monitors take the running nodes again through their own watches
            c.subscribeStateChanges(new IZkStateListener() {

                public void handleStateChanged(KeeperState state) {
                    LOG.info("## ZooKeeper session state: {}", state);
                }

                public void handleNewSession() {
                    LOG.info("## new ZooKeeper session: registering {} again", serverNode);
                    ephemeral(c, serverNode);
                    for (String d : destinations) {
                        if (embedded.isStart(d)) {
                            ephemeral(c, ZookeeperPathUtils.getDestinationClusterNode(d, address));
                        }
                    }
                }

                public void handleSessionEstablishmentError(Throwable error) {
                    LOG.warn("## ZooKeeper session could not be established", error);
                }
            });
        }
        final int delaySeconds = Integer.parseInt(setting(conf, "canal.zookeeper.running.delay", "5"));

        ServerRunningData data = new ServerRunningData(address);
        ServerRunningMonitors.setServerData(data);
        final Map<String, ServerRunningMonitor> monitors = new Monitors(data, embedded, delaySeconds);
        ServerRunningMonitors.setRunningMonitors(monitors);

        LOG.info("## start the canal server [{}:{}] destinations={} auth={}", ip, port, destinations,
            passwd.isEmpty() ? "off" : "on");
        embedded.start();
        for (String d : destinations) {
            ServerRunningMonitor m = ServerRunningMonitors.getRunningMonitor(d);
            if (!m.isStart()) {
                m.start();
            }
            if (zk != null && !embedded.isStart(d)) {
                LOG.info("## destination {} runs on another server: standing by", d);
                continue;
            }
            if (!embedded.isStart(d)) {
                // the monitor logged the cause ("start failed"); a half-started server helps no test
                LOG.error("## destination {} did not start, exiting", d);
                System.exit(1);
            }
        }

        final CanalServerWithNetty netty = CanalServerWithNetty.instance();
        netty.setIp(ip);
        netty.setPort(port);
        netty.start();

        final CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            LOG.info("## stop the canal server");
            try {
                netty.stop(); // closes the port, then stops the embedded server
                for (ServerRunningMonitor m : monitors.values()) {
                    if (m.isStart()) {
                        m.stop();
                    }
                }
                if (embedded.isStart()) {
                    embedded.stop();
                }
                if (zk != null) {
                    zk.close(); // ends the session: our ephemeral nodes go at once
                }
            } catch (Throwable e) {
                LOG.warn("## error while stopping the canal server", e);
            } finally {
                LOG.info("## canal server is down");
                stopped.countDown();
            }
        }, "canal-local-shutdown"));
        LOG.info("## the canal server is running now ......");
        stopped.await();
    }
}
