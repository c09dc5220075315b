//! The resilience scenarios, each on a real topology (3 Redis, 3 Sentinels, 3 registry
//! processes, nginx) under a steady background load of lookups and registrations through the
//! load balancer: kill replicas, kill the Redis master, a planned failover, a full Redis
//! outage, and TTL expiry.

mod common;

use std::time::{Duration, Instant};

use common::{Ha, eventually, missing_keys};
use rollcall::load::{self, LoadReport, LoadSpec};

const WRITE_SERVICE: &str = "load-writer";

fn spec(ha: &Ha, reads: Vec<String>) -> LoadSpec {
    LoadSpec {
        read_services: reads,
        readers: 4,
        writers: 2,
        pause: Duration::from_millis(10),
        write_service: WRITE_SERVICE.into(),
        max_duration: Duration::from_secs(120),
        ..LoadSpec::new(ha.lb())
    }
}

async fn assert_all_acknowledged_present(ha: &Ha, report: &LoadReport) {
    let present = ha.instance_ids(WRITE_SERVICE).await;
    let lost: Vec<&String> = report
        .acknowledged
        .iter()
        .filter(|id| !present.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged registrations are lost: {:?}",
        lost.len(),
        report.acknowledged.len(),
        &lost[..lost.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_then_two_registry_replicas_fails_no_request() {
    let mut ha = Ha::start().await;
    let seeds = ha.seed(5).await;
    let load = load::start(spec(&ha, seeds.clone())).expect("load");
    assert!(load.run_until(200, 20, Duration::from_secs(20)).await);

    ha.topology.registries[0].process().kill();
    assert!(load.run_until(300, 30, Duration::from_secs(20)).await);
    ha.topology.registries[1].process().kill();
    assert!(
        load.run_until(300, 30, Duration::from_secs(20)).await,
        "the last replica keeps serving"
    );

    ha.topology.registries[0]
        .restart()
        .await
        .expect("a killed replica restarts");
    let rejoined = ha.topology.registries[0].url();
    assert!(load.run_until(300, 30, Duration::from_secs(20)).await);
    let report = load.stop().await;
    eprintln!("{}", report.summary());

    assert_eq!(report.reads.failed, 0, "{}", report.summary());
    assert_eq!(report.writes.failed, 0, "{}", report.summary());
    let resp = ha
        .http
        .get(format!("{rejoined}/services/{}", seeds[0]))
        .send()
        .await
        .expect("the restarted replica answers");
    assert_eq!(
        resp.status().as_u16(),
        200,
        "the restarted replica rejoined"
    );
    assert_all_acknowledged_present(&ha, &report).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_redis_master_fails_over_without_failed_reads_or_lost_writes() {
    let mut ha = Ha::start().await;
    let seeds = ha.seed(5).await;
    let load = load::start(spec(&ha, seeds)).expect("load");
    assert!(load.run_until(300, 30, Duration::from_secs(20)).await);

    let old = ha.topology.master_index().await.expect("a master");
    let killed_at = load.elapsed();
    ha.topology.redis[old].process().kill();
    let new = ha
        .topology
        .wait_for_new_master(old, Duration::from_secs(20))
        .await
        .expect("Sentinel promotes a replica");
    assert!(
        load.run_until(300, 50, Duration::from_secs(20)).await,
        "writes resume after the failover"
    );
    let report = load.stop().await;
    eprintln!("failover to node {new}\n{}", report.summary());

    assert_eq!(report.reads.failed, 0, "{}", report.summary());
    if let Some(last) = report.writes.last_failure_s {
        let outage = last - killed_at.as_secs_f64();
        eprintln!("writes failed for {outage:.2} s after the master was killed");
        assert!(
            outage < 5.0,
            "writes must succeed again within 5 s of the master's death, took {outage:.2} s"
        );
        assert!(
            report.writes.failures_by_kind.keys().all(|k| k == "503"),
            "writes during a failover are refused with 503, nothing else: {:?}",
            report.writes.failures_by_kind
        );
    }
    assert_all_acknowledged_present(&ha, &report).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_failover_leaves_no_acknowledged_write_behind_on_the_old_master() {
    let ha = Ha::start().await;
    let load = load::start(spec(&ha, Vec::new())).expect("load");
    assert!(load.run_until(0, 50, Duration::from_secs(20)).await);

    let old = ha.topology.master_index().await.expect("a master");
    let sentinel = format!("redis://{}", ha.topology.sentinel_addrs()[0]);
    let client = redis::Client::open(sentinel).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("sentinel");
    let _: String = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(rollcall::launch::MASTER_NAME)
        .query_async(&mut conn)
        .await
        .expect("SENTINEL FAILOVER");
    let new = ha
        .topology
        .wait_for_new_master(old, Duration::from_secs(20))
        .await
        .expect("the failover completes");
    assert!(load.run_until(0, 50, Duration::from_secs(20)).await);
    let report = load.stop().await;
    eprintln!("planned failover {old} -> {new}\n{}", report.summary());

    let keys: Vec<String> = report
        .acknowledged
        .iter()
        .map(|id| format!("rollcall:i:{WRITE_SERVICE}:{id}"))
        .collect();
    let lost = missing_keys(&ha.topology.redis[new].url(), &keys).await;
    for (i, r) in ha.topology.redis.iter().enumerate() {
        let missing_there = missing_keys(&r.url(), &lost).await.len();
        eprintln!(
            "node {i}: has {} of the {} keys missing on the new master",
            lost.len() - missing_there,
            lost.len()
        );
    }
    assert!(
        lost.is_empty(),
        "acknowledged writes missing on the new master: {} of {}: {:?}",
        lost.len(),
        keys.len(),
        &lost[..lost.len().min(10)]
    );
    assert_all_acknowledged_present(&ha, &report).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_outage_serves_stale_reads_refuses_writes_and_recovers() {
    let mut ha = Ha::start().await;
    let seeds = ha.seed(5).await;
    let load = load::start(spec(&ha, seeds.clone())).expect("load");
    assert!(load.run_until(300, 30, Duration::from_secs(20)).await);

    for r in &mut ha.topology.redis {
        r.stop();
    }
    let opened = eventually(Duration::from_secs(10), || async {
        ha.replica_health().await.iter().all(|h| {
            h["components"]["redis"]["circuit_breaker"]["state"] != "closed"
                && h["components"]["redis"]["status"] == "down"
        })
    })
    .await;
    assert!(
        opened,
        "every replica's breaker opens: {:?}",
        ha.replica_health().await
    );
    let metrics = common::fetch_text(
        &ha.http,
        &format!("{}/metrics", ha.topology.registries[0].url()),
    )
    .await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "registry_circuit_breaker_open 1"),
        "{metrics}"
    );

    assert!(load.run_until(300, 0, Duration::from_secs(20)).await);
    let resp = ha
        .http
        .get(format!("{}/services/{}", ha.lb(), seeds[0]))
        .send()
        .await
        .expect("lookup");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["x-rollcall-stale"], "true");
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["stale"], true);
    let resp = ha
        .http
        .post(format!("{}/register", ha.lb()))
        .json(&serde_json::json!({"service_name": "during-outage", "endpoint": "http://x:1"}))
        .send()
        .await
        .expect("register");
    assert_eq!(resp.status().as_u16(), 503, "writes are refused, not lost");
    assert!(resp.headers().contains_key("retry-after"));

    // Master first, so it comes back as the master its replicas follow.
    for r in &mut ha.topology.redis {
        r.restart().await.expect("Redis restarts");
    }
    let back = Instant::now();
    let closed = eventually(Duration::from_secs(10), || async {
        ha.replica_health().await.iter().all(|h| {
            h["components"]["redis"]["circuit_breaker"]["state"] == "closed"
                && h["status"] == "healthy"
        })
    })
    .await;
    let took = back.elapsed();
    eprintln!(
        "breakers closed {:.2} s after Redis returned",
        took.as_secs_f64()
    );
    assert!(
        closed,
        "breakers close again: {:?}",
        ha.replica_health().await
    );
    assert!(
        took < Duration::from_secs(5),
        "the breaker should close within about a second of Redis returning, took {took:?}"
    );

    assert!(load.run_until(100, 30, Duration::from_secs(20)).await);
    let report = load.stop().await;
    eprintln!("{}", report.summary());
    assert_eq!(report.reads.failed, 0, "{}", report.summary());
    assert!(
        report.reads.stale > 0,
        "reads during the outage are flagged stale"
    );
    assert!(
        report.writes.failed > 0,
        "writes during the outage are refused"
    );
    assert!(
        report.writes.failures_by_kind.keys().all(|k| k == "503"),
        "{:?}",
        report.writes.failures_by_kind
    );
    assert_all_acknowledged_present(&ha, &report).await;
    let resp = ha
        .http
        .get(format!("{}/services/during-outage", ha.lb()))
        .send()
        .await
        .expect("lookup");
    assert_eq!(
        resp.status().as_u16(),
        404,
        "a refused write left nothing behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_stops_heartbeating_disappears_after_its_ttl() {
    let ha = Ha::start().await;
    let resp = ha
        .http
        .post(format!("{}/register", ha.lb()))
        .json(&serde_json::json!({"service_name": "osint_service", "endpoint": "http://osint:8049", "ttl_s": 2}))
        .send()
        .await
        .expect("register");
    assert_eq!(resp.status().as_u16(), 201);
    let lb = ha.lb();
    let gone = eventually(Duration::from_secs(10), || async {
        let names: Vec<String> = ha
            .http
            .get(format!("{lb}/services"))
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("json");
        !names.iter().any(|n| n == "osint_service")
    })
    .await;
    assert!(gone, "the service must leave the list after its 2 s TTL");
    let resp = ha
        .http
        .get(format!("{lb}/services/osint_service"))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status().as_u16(), 404);
    let resp = ha
        .http
        .post(format!("{lb}/heartbeat"))
        .json(&serde_json::json!({"service_name": "osint_service"}))
        .send()
        .await
        .expect("heartbeat");
    assert_eq!(
        resp.status().as_u16(),
        404,
        "its heartbeat is told to re-register"
    );
}
