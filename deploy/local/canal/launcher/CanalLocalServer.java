/*
 * A small stand-in for canal's `canal.deployer` module, for local tests only.
 *
 * Why it exists: the Maven Central mirror reachable from our machines serves the Canal
 * server modules (canal.server, canal.instance.*, canal.parse, ...) only up to 1.1.7 and the
 * deployer (CanalLauncher/CanalController) only up to 1.1.4, so the release's own launcher
 * cannot be had. Everything that matters to a client -- the TCP protocol, auth, sessions,
 * get/ack/rollback, the binlog parser, the memory store and the file meta manager -- lives in
 * canal.server and the modules under it, which we run unchanged. This class only does what
 * the deployer does in the plain standalone set-up (serverMode=tcp, no ZooKeeper, no admin,
 * no MQ, no auto-scan):
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

    private CanalLocalServer() {
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

        Monitors(ServerRunningData data, CanalServerWithEmbedded embedded) {
            this.data = data;
            this.embedded = embedded;
        }

        @Override
        public ServerRunningMonitor get(Object key) {
            final String destination = String.valueOf(key);
            return computeIfAbsent(destination, d -> {
                ServerRunningMonitor m = new ServerRunningMonitor(data);
                m.setDestination(d);
                m.setListener(new ServerRunningListener() {

                    public void processStart() {
                    }

                    public void processStop() {
                    }

                    public void processActiveEnter() {
                        MDC.put("destination", d);
                        try {
                            embedded.start(d);
                        } finally {
                            MDC.remove("destination");
                        }
                    }

                    public void processActiveExit() {
                        MDC.put("destination", d);
                        try {
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
        if (!setting(conf, "canal.zkServers", "").isEmpty()) {
            throw new IllegalArgumentException("canal.zkServers is not supported by this launcher");
        }
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

        ServerRunningData data = new ServerRunningData(ip + ":" + port);
        ServerRunningMonitors.setServerData(data);
        final Map<String, ServerRunningMonitor> monitors = new Monitors(data, embedded);
        ServerRunningMonitors.setRunningMonitors(monitors);

        LOG.info("## start the canal server [{}:{}] destinations={} auth={}", ip, port, destinations,
            passwd.isEmpty() ? "off" : "on");
        embedded.start();
        for (String d : destinations) {
            ServerRunningMonitor m = ServerRunningMonitors.getRunningMonitor(d);
            if (!m.isStart()) {
                m.start();
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
