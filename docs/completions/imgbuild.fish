# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_imgbuild_global_optspecs
    string join \n h/help V/version
end

function __fish_imgbuild_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_imgbuild_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_imgbuild_using_subcommand
    set -l cmd (__fish_imgbuild_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c imgbuild -n "__fish_imgbuild_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -s V -l version -d 'Print version'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "build" -d 'Build a host: disk image (raw, qcow2) or Ignition config'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "render" -d 'Write the host tree to a directory, for reading and diffing'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "keys" -d 'Create the host\'s keys (WireGuard, SSH host key, snapshot keys) and the builder\'s signing key'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "init" -d 'First deployment: create the host\'s keys and mark its (empty) bucket prefix so its first boot starts empty'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "summary" -d 'Show what a profile builds: containers, ports, peers, backups'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "verify" -d 'Check an image against its signed manifest'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "run" -d 'Boot an image in QEMU: a disposable staging copy of the host'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "backup" -d 'Snapshot volumes to S3 (in the image; or from a workstation with a profile and --from)'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "snapshots" -d 'List a host\'s snapshots'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "restore" -d 'Restore a snapshot into a directory'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "check" -d 'Check a host\'s snapshots (all packs read with --read-data, a share with --read-data-subset; in the image: the check timer\'s job)'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "drill" -d 'Disaster-recovery drill: boot the host\'s image in an isolated QEMU, restore from the bucket read-only, check services'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "drill-relay" -d 'Drill internals: QEMU runs this once per guest connection to the read-only gateway'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "firstboot" -d 'In the image: restore volumes from the latest snapshot before services start'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "ready" -d 'In the image: wait for the host\'s units, print the readiness line on the console'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "postgres-prepare" -d 'In the image: write a PostgreSQL volume\'s WAL archive settings before its container starts'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "wal-ship" -d 'In the image: ship PostgreSQL WAL files from the spool to the bucket as they are finished (imgbuild-wal.service)'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "upload" -d 'Upload an image (and its signed manifest) to s3://bucket/key for a provider\'s import'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "secrets" -d 'Encrypt (lock) or decrypt (unlock) the secrets directory with age'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "gen-docs" -d 'Regenerate man pages and shell completions (for packagers; docs/ holds a copy)'
complete -c imgbuild -n "__fish_imgbuild_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l env -d 'Environment overlay from the profile\'s [environments] (default: host.default_env)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l secrets -d 'Secrets root holding <host>/ and builder/ (default: secrets/ beside profiles/)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l overlay -d 'Extra overlay file merged last (tests, local tweaks); may repeat' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l identity -d 'age identity file to open a locked secrets root (or IMGBUILD_AGE_IDENTITY; a passphrase comes from IMGBUILD_PASSPHRASE)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -s o -l out -d 'Output file; its extension (.raw, .img, .qcow2, .ign) picks the format' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l format -d 'Output format (overrides the extension)' -r -f -a "raw\t''
qcow2\t''
ignition\t''"
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l ignition-version -d 'Ignition spec version' -r -f -a "3.4.0\t''
3.5.0\t''
3.6.0\t''"
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l helper-url -d 'Where an Ignition host downloads this imgbuild binary (https:// or s3://)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l helper -d 'The helper binary put in the image or hashed for --helper-url (default: this binary)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l base -d 'Base OS definition (default: images/<host.base>.toml)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l allow-missing-credentials -d 'Build even though the host restores from its bucket (restore = "require") and the image would carry no S3 credentials (no secrets/<host>/s3.env): for hosts that get credentials another way, e.g. an instance role'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l refresh-base -d 'Rebuild the cached base OS'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -s q -l quiet -d 'No progress output'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -l json -d 'Print a JSON summary on stdout'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand build" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand render" -l env -d 'Environment overlay from the profile\'s [environments] (default: host.default_env)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand render" -l secrets -d 'Secrets root holding <host>/ and builder/ (default: secrets/ beside profiles/)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand render" -l overlay -d 'Extra overlay file merged last (tests, local tweaks); may repeat' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand render" -l identity -d 'age identity file to open a locked secrets root (or IMGBUILD_AGE_IDENTITY; a passphrase comes from IMGBUILD_PASSPHRASE)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand render" -s o -l out -d 'Directory to write (must not exist, or be empty)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand render" -l target -d 'Render for a disk image (helper in /usr/bin) or an Ignition host (/usr/local/bin)' -r -f -a "image\t''
ignition\t''"
complete -c imgbuild -n "__fish_imgbuild_using_subcommand render" -l json -d 'Print the tree as JSON (paths, modes, owners, sizes; never contents) on stdout'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand render" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand keys" -l env -d 'Environment overlay from the profile\'s [environments] (default: host.default_env)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand keys" -l secrets -d 'Secrets root holding <host>/ and builder/ (default: secrets/ beside profiles/)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand keys" -l overlay -d 'Extra overlay file merged last (tests, local tweaks); may repeat' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand keys" -l identity -d 'age identity file to open a locked secrets root (or IMGBUILD_AGE_IDENTITY; a passphrase comes from IMGBUILD_PASSPHRASE)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand keys" -l json
complete -c imgbuild -n "__fish_imgbuild_using_subcommand keys" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand init" -l env -d 'Environment overlay from the profile\'s [environments] (default: host.default_env)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand init" -l secrets -d 'Secrets root holding <host>/ and builder/ (default: secrets/ beside profiles/)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand init" -l overlay -d 'Extra overlay file merged last (tests, local tweaks); may repeat' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand init" -l identity -d 'age identity file to open a locked secrets root (or IMGBUILD_AGE_IDENTITY; a passphrase comes from IMGBUILD_PASSPHRASE)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand init" -l bucket -d 'Use this bucket instead of the profile\'s' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand init" -l prefix -d 'Use this key prefix instead of the profile\'s per-host prefix' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand init" -l endpoint -d 'S3 endpoint URL (default: the profile\'s, or AWS_ENDPOINT_URL_S3); implies path-style' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand init" -l json
complete -c imgbuild -n "__fish_imgbuild_using_subcommand init" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand summary" -l env -d 'Environment overlay from the profile\'s [environments] (default: host.default_env)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand summary" -l secrets -d 'Secrets root holding <host>/ and builder/ (default: secrets/ beside profiles/)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand summary" -l overlay -d 'Extra overlay file merged last (tests, local tweaks); may repeat' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand summary" -l identity -d 'age identity file to open a locked secrets root (or IMGBUILD_AGE_IDENTITY; a passphrase comes from IMGBUILD_PASSPHRASE)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand summary" -l json
complete -c imgbuild -n "__fish_imgbuild_using_subcommand summary" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand verify" -l key -d 'Builder\'s public key: a file with 64 hex characters, or the hex itself' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand verify" -l secrets -d 'Secrets root whose builder/image-signing.pub to use (default: ./secrets)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand verify" -l json
complete -c imgbuild -n "__fish_imgbuild_using_subcommand verify" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand run" -l ssh-port -d 'Host port on 127.0.0.1 forwarded to the guest\'s SSH' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand run" -l forward -d 'Extra forward HOST:GUEST (TCP, on 127.0.0.1); may repeat' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand run" -l profile -d 'Forward the public TCP ports this profile publishes (ports below 1024 as 8000+port)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand run" -l memory -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand run" -l cpus -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand run" -l disk-size -d 'Present a bigger disk, like a provider\'s (e.g. 20G)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand run" -l persist -d 'Keep the guest\'s writes in the image (default: throw them away)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand run" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand backup" -l from -d 'Directory holding one sub-directory per volume (`<volume>/_data` or `<volume>`)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand backup" -l config -d 'Host config to read in the image' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand backup" -l timeout -d 'Seconds the final snapshot may take (the profile\'s final_snapshot_timeout)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand backup" -l bucket -d 'Use this bucket instead of the profile\'s' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand backup" -l prefix -d 'Use this key prefix instead of the profile\'s per-host prefix' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand backup" -l endpoint -d 'S3 endpoint URL (default: the profile\'s, or AWS_ENDPOINT_URL_S3); implies path-style' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand backup" -l env -d 'Environment overlay from the profile\'s [environments]' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand backup" -l secrets -d 'Secrets root holding <host>/ (default: secrets/ beside profiles/)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand backup" -l prune -d 'Apply the profile\'s retention after the snapshot (always done in the image)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand backup" -l final -d 'In the image, at shutdown (imgbuild-final-snapshot.service): the containers have stopped; snapshot without quiescing or pruning, within --timeout seconds'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand backup" -l json -d 'Print the result as JSON on stdout'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand backup" -s q -l quiet -d 'No progress output'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand backup" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand snapshots" -l bucket -d 'Use this bucket instead of the profile\'s' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand snapshots" -l prefix -d 'Use this key prefix instead of the profile\'s per-host prefix' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand snapshots" -l endpoint -d 'S3 endpoint URL (default: the profile\'s, or AWS_ENDPOINT_URL_S3); implies path-style' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand snapshots" -l env -d 'Environment overlay from the profile\'s [environments]' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand snapshots" -l secrets -d 'Secrets root holding <host>/ (default: secrets/ beside profiles/)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand snapshots" -l json
complete -c imgbuild -n "__fish_imgbuild_using_subcommand snapshots" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand restore" -l snapshot -d 'Snapshot id (default: the newest that verifies)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand restore" -l to -d 'Directory to restore into, as `<DIR>/<volume>/_data` (podman\'s layout)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand restore" -l volume -d 'Only this volume (repeatable)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand restore" -l bucket -d 'Use this bucket instead of the profile\'s' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand restore" -l prefix -d 'Use this key prefix instead of the profile\'s per-host prefix' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand restore" -l endpoint -d 'S3 endpoint URL (default: the profile\'s, or AWS_ENDPOINT_URL_S3); implies path-style' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand restore" -l env -d 'Environment overlay from the profile\'s [environments]' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand restore" -l secrets -d 'Secrets root holding <host>/ (default: secrets/ beside profiles/)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand restore" -l no-owners -d 'Do not chown to the stored owners (default when not root)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand restore" -l json
complete -c imgbuild -n "__fish_imgbuild_using_subcommand restore" -s q -l quiet
complete -c imgbuild -n "__fish_imgbuild_using_subcommand restore" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand check" -l read-data-subset -d 'Download and verify a random share of the packs: 10%, 0.1 or 1/10 (run weekly, 10% reads each pack once every ten weeks on average)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand check" -l config -d 'Host config to read in the image' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand check" -l bucket -d 'Use this bucket instead of the profile\'s' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand check" -l prefix -d 'Use this key prefix instead of the profile\'s per-host prefix' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand check" -l endpoint -d 'S3 endpoint URL (default: the profile\'s, or AWS_ENDPOINT_URL_S3); implies path-style' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand check" -l env -d 'Environment overlay from the profile\'s [environments]' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand check" -l secrets -d 'Secrets root holding <host>/ (default: secrets/ beside profiles/)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand check" -l read-data -d 'Also download and verify every pack and chunk'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand check" -l json
complete -c imgbuild -n "__fish_imgbuild_using_subcommand check" -s q -l quiet
complete -c imgbuild -n "__fish_imgbuild_using_subcommand check" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand drill" -l env -d 'Environment overlay from the profile\'s [environments] (default: host.default_env)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand drill" -l secrets -d 'Secrets root holding <host>/ and builder/ (default: secrets/ beside profiles/)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand drill" -l overlay -d 'Extra overlay file merged last (tests, local tweaks); may repeat' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand drill" -l identity -d 'age identity file to open a locked secrets root (or IMGBUILD_AGE_IDENTITY; a passphrase comes from IMGBUILD_PASSPHRASE)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand drill" -l snapshot -d 'Snapshot id to restore (default: the newest in the bucket)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand drill" -l image -d 'Drill this image (checked against its signed manifest first) instead of building one' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand drill" -l key -d 'Builder\'s public key for --image: a file with 64 hex characters, or the hex itself (default: <secrets>/builder/image-signing.pub)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand drill" -l bucket -d 'Use this bucket instead of the profile\'s' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand drill" -l prefix -d 'Use this key prefix instead of the profile\'s per-host prefix' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand drill" -l endpoint -d 'S3 endpoint URL (default: the profile\'s, or AWS_ENDPOINT_URL_S3); implies path-style' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand drill" -l timeout -d 'Give up when the guest is not ready after this many seconds' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand drill" -l console-log -d 'Keep the guest\'s serial console log in this file' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand drill" -l memory -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand drill" -l cpus -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand drill" -l allow-egress -d 'Let the guest reach the internet, for containers whose images are pulled from a registry rather than baked. WireGuard stays down, backups stay off and the bucket is still reached only through the read-only gateway (the guest holds dummy bucket credentials, so --image, which carries the real ones, is refused), but the apps themselves may talk to the outside (federation, mail): bake the images instead when you can'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand drill" -l json -d 'Print the report as JSON on stdout'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand drill" -s q -l quiet -d 'Print nothing unless the drill fails (for cron)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand drill" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand drill-relay" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand firstboot" -l config -d 'Host config to read' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand firstboot" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand ready" -l config -d 'Host config to read' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand ready" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand postgres-prepare" -l config -d 'Host config to read' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand postgres-prepare" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand wal-ship" -l config -d 'Host config to read' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand wal-ship" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand upload" -l endpoint -d 'S3 endpoint (default: AWS_ENDPOINT_URL_S3, or AWS); implies path-style' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand upload" -l region -d 'Region (default: AWS_REGION, else us-east-1)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand upload" -l part-mib -d 'Part size in MiB (64: a 2 GiB image is 32 parts, far under S3\'s 10 000-part limit)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand upload" -s q -l quiet
complete -c imgbuild -n "__fish_imgbuild_using_subcommand upload" -l json
complete -c imgbuild -n "__fish_imgbuild_using_subcommand upload" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand secrets; and not __fish_seen_subcommand_from lock unlock help" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand secrets; and not __fish_seen_subcommand_from lock unlock help" -f -a "lock" -d 'Pack secrets/ into secrets.age (to age recipients, an identity or a passphrase); the directory is removed only once the archive has been decrypted and matches it byte for byte'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand secrets; and not __fish_seen_subcommand_from lock unlock help" -f -a "unlock" -d 'Unpack secrets.age back into secrets/'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand secrets; and not __fish_seen_subcommand_from lock unlock help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand secrets; and __fish_seen_subcommand_from lock" -l secrets -d 'Secrets root (default: ./secrets)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand secrets; and __fish_seen_subcommand_from lock" -s r -l recipient -d 'age recipient (age1...); may repeat. Without --identity nothing proves the archive opens, so the directory is kept until `--confirm-with`' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand secrets; and __fish_seen_subcommand_from lock" -l identity -d 'age identity file: lock to its recipient too (besides any -r), and open the archive with it before removing the directory' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand secrets; and __fish_seen_subcommand_from lock" -l passphrase-env -d 'Name of an environment variable holding the passphrase (instead of recipients)' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand secrets; and __fish_seen_subcommand_from lock" -l confirm-with -d 'Finish a lock to recipients: check that secrets.age opens with this identity file and holds every file of the directory, then remove the directory' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand secrets; and __fish_seen_subcommand_from lock" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand secrets; and __fish_seen_subcommand_from unlock" -l secrets -d 'Secrets root (default: ./secrets)' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand secrets; and __fish_seen_subcommand_from unlock" -l identity -d 'age identity file' -r -F
complete -c imgbuild -n "__fish_imgbuild_using_subcommand secrets; and __fish_seen_subcommand_from unlock" -l passphrase-env -d 'Name of an environment variable holding the passphrase' -r
complete -c imgbuild -n "__fish_imgbuild_using_subcommand secrets; and __fish_seen_subcommand_from unlock" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand secrets; and __fish_seen_subcommand_from help" -f -a "lock" -d 'Pack secrets/ into secrets.age (to age recipients, an identity or a passphrase); the directory is removed only once the archive has been decrypted and matches it byte for byte'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand secrets; and __fish_seen_subcommand_from help" -f -a "unlock" -d 'Unpack secrets.age back into secrets/'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand secrets; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand gen-docs" -s h -l help -d 'Print help'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "build" -d 'Build a host: disk image (raw, qcow2) or Ignition config'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "render" -d 'Write the host tree to a directory, for reading and diffing'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "keys" -d 'Create the host\'s keys (WireGuard, SSH host key, snapshot keys) and the builder\'s signing key'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "init" -d 'First deployment: create the host\'s keys and mark its (empty) bucket prefix so its first boot starts empty'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "summary" -d 'Show what a profile builds: containers, ports, peers, backups'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "verify" -d 'Check an image against its signed manifest'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "run" -d 'Boot an image in QEMU: a disposable staging copy of the host'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "backup" -d 'Snapshot volumes to S3 (in the image; or from a workstation with a profile and --from)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "snapshots" -d 'List a host\'s snapshots'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "restore" -d 'Restore a snapshot into a directory'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "check" -d 'Check a host\'s snapshots (all packs read with --read-data, a share with --read-data-subset; in the image: the check timer\'s job)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "drill" -d 'Disaster-recovery drill: boot the host\'s image in an isolated QEMU, restore from the bucket read-only, check services'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "drill-relay" -d 'Drill internals: QEMU runs this once per guest connection to the read-only gateway'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "firstboot" -d 'In the image: restore volumes from the latest snapshot before services start'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "ready" -d 'In the image: wait for the host\'s units, print the readiness line on the console'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "postgres-prepare" -d 'In the image: write a PostgreSQL volume\'s WAL archive settings before its container starts'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "wal-ship" -d 'In the image: ship PostgreSQL WAL files from the spool to the bucket as they are finished (imgbuild-wal.service)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "upload" -d 'Upload an image (and its signed manifest) to s3://bucket/key for a provider\'s import'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "secrets" -d 'Encrypt (lock) or decrypt (unlock) the secrets directory with age'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "gen-docs" -d 'Regenerate man pages and shell completions (for packagers; docs/ holds a copy)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and not __fish_seen_subcommand_from build render keys init summary verify run backup snapshots restore check drill drill-relay firstboot ready postgres-prepare wal-ship upload secrets gen-docs help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and __fish_seen_subcommand_from secrets" -f -a "lock" -d 'Pack secrets/ into secrets.age (to age recipients, an identity or a passphrase); the directory is removed only once the archive has been decrypted and matches it byte for byte'
complete -c imgbuild -n "__fish_imgbuild_using_subcommand help; and __fish_seen_subcommand_from secrets" -f -a "unlock" -d 'Unpack secrets.age back into secrets/'
