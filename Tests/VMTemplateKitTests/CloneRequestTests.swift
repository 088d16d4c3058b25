import Foundation
import Testing

@testable import VMTemplateKit
@testable import VMTemplateOS
@testable import VMTemplateQEMU
@testable import VMTemplateStore

@Suite("clone requests: one parser and one check for the CLI and the API")
struct CloneOptionsTests {
    func decode(_ json: String) throws -> CloneOptions {
        try JSONCoding.decoder().decode(CloneOptions.self, from: Data(json.utf8))
    }

    @Test("the API's JSON and the CLI's options make the same request")
    func sameRequest() throws {
        let fromJSON = try decode(#"{"template": "busybox", "name": "web-1", "vmgenid": false, "tcg_tb_size": 8, "timeout": 12.5, "cow_limit": "64M", "over_limit": "kill", "nics": [{"backend": "user"}], "disks": [], "no_pool": true}"#).request()
        let fromOptions = try CloneOptions(template: "busybox", name: "web-1", vmgenid: false, allowWritableTemplate: false, tcgTranslationCacheMiB: 8, timeoutSeconds: 12.5, cowLimit: "64M", overLimit: .kill, nics: ["user"], disks: [], noPool: true).request()
        #expect(fromJSON == fromOptions)
        #expect(fromJSON.cowLimitBytes == 64 << 20 && fromJSON.timeout == .milliseconds(12_500) && !fromJSON.usePool && !fromJSON.freshGenerationID && fromJSON.devices.nics.count == 1)
        // What a caller leaves out is the CLI's default.
        let plain = try decode(#"{"template": "busybox"}"#).request()
        #expect(plain == CloneRequest(template: try EntityName("busybox")))
    }

    @Test("a NIC or disk object is the CLI's spec, parsed by the same parser")
    func deviceObjects() throws {
        let objects = try decode(#"{"template": "t", "nics": [{"backend": "tap", "tap": "tap0", "netns": "/run/netns/n1", "mac": "02:00:00:00:00:07"}, {"backend": "user", "hostfwd": ["tcp:127.0.0.1:2222-:22", "udp::5353-:53"]}], "disks": [{"path": "/srv/a.img", "format": "qcow2", "readonly": true, "overlay": false}]}"#).request()
        let specs = try CloneOptions(template: "t", nics: ["tap=tap0,netns=/run/netns/n1,mac=02:00:00:00:00:07", "user,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp::5353-:53"], disks: ["path=/srv/a.img,format=qcow2,readonly=on,overlay=off"]).request()
        #expect(objects.devices == specs.devices)
    }

    @Test("bad requests are refused with one sentence that names the option and the field", arguments: [
        (#"{"template": "busybox", "cow_limt": "64M"}"#, "unknown field 'cow_limt'"),
        (#"{"template": "busybox", "tcg_tb_size": 0}"#, "--tcg-tb-size, tcg_tb_size"),
        (#"{"template": "busybox", "tcg_tb_size": 65537}"#, "--tcg-tb-size, tcg_tb_size"),
        (#"{"template": "busybox", "timeout": 0}"#, "--timeout, timeout"),
        (#"{"template": "busybox", "timeout": 86401}"#, "--timeout, timeout"),
        (#"{"template": "busybox", "cow_limit": "8192G"}"#, "--cow-limit"),
        ("{\"template\": \"busybox\", \"nics\": [" + Array(repeating: "{\"backend\": \"user\"}", count: 33).joined(separator: ", ") + "]}", "--nic/--disk, nics/disks"),
        (#"{"template": "busybox", "nics": ["user"]}"#, "as an object"),
        (#"{"template": "busybox", "disks": [{"path": "/a.img,readonly=off"}]}"#, "holds ',' or '='"),
        (#"{"template": "busybox", "nics": [{"backend": "tap"}]}"#, "--nic"),
        (#"{"template": "busybox", "nics": [{"backend": "user", "hostfwd": ["tcp::8080-:80", "tcp::08080-:81"]}]}"#, "same host port"),
        ("{\"template\": \"busybox\", \"nics\": [{\"backend\": \"user\", \"hostfwd\": [\"tcp:\u{0663}:8080-:80\"]}]}", "not a forwarding rule"),
        (#"{"template": "busybox", "timeout": 0.5}"#, "--timeout, timeout"),
        (#"{"template": "../etc"}"#, "name"),
    ])
    func refused(json: String, says: String) throws {
        do {
            _ = try decode(json).request()
            Issue.record("accepted: \(json)")
        } catch let error as VMTemplateError {
            #expect(error.code == .invalidArgument, "\(json): \(error)")
            #expect(error.message.contains(says), "\(json): \(error.message)")
            #expect(!error.message.contains("\n"))
        }
    }
}

@Suite("the clone's memory backend")
struct CloneMemoryOptionsTests {
    @Test("without rom= a clone needs --allow-writable-template, and gets a warning")
    func writableTemplateChoice() throws {
        let old = QEMUCapabilities(version: QEMUVersion(7, 2))
        #expect(throws: VMTemplateError.self) { try CloneLauncher.memoryOptions(capabilities: old, allowWritableTemplate: false) }
        let (options, warning) = try CloneLauncher.memoryOptions(capabilities: old, allowWritableTemplate: true)
        #expect(options == .writableClone && options.openMode == .readWrite && options.mapping == .private)
        #expect(warning?.contains("read-write") == true)
        let current = QEMUCapabilities(version: QEMUVersion(10, 0))
        let (cloneOptions, noWarning) = try CloneLauncher.memoryOptions(capabilities: current, allowWritableTemplate: true)
        #expect(cloneOptions == .clone && noWarning == nil, "with rom= the read-only clone is always used")
    }
}

@Suite("the scheduler's decision over a limit")
struct SchedulerDecisionTests {
    func previous(_ action: OverLimitAction, done: Bool, attempt: Int? = nil, escalated: Bool? = nil) -> Enforcement {
        Enforcement(time: Date(), clone: "0123456789ab", name: "c", cowBytes: 2, limitBytes: 1, action: action, done: done, error: done ? nil : "failed", attempt: attempt, escalated: escalated)
    }

    @Test("pauses until pause_attempts fail in a row, then the stop ladder; an escalated stop that failed stays escalated")
    func decisions() {
        #expect(Scheduler.decide(configured: .pause, previous: nil, pauseAttempts: 2) == (.pause, false, 0))
        #expect(Scheduler.decide(configured: .pause, previous: previous(.pause, done: false, attempt: 1), pauseAttempts: 2) == (.pause, false, 1))
        #expect(Scheduler.decide(configured: .pause, previous: previous(.pause, done: false, attempt: 2), pauseAttempts: 2) == (.kill, true, 2))
        #expect(Scheduler.decide(configured: .pause, previous: previous(.kill, done: false, escalated: true), pauseAttempts: 2) == (.kill, true, 0))
        #expect(Scheduler.decide(configured: .pause, previous: previous(.pause, done: true, attempt: 1), pauseAttempts: 2) == (.pause, false, 0))
        #expect(Scheduler.decide(configured: .kill, previous: nil, pauseAttempts: 2) == (.kill, false, 0))
    }
}
